"""pytest-benchmark over the quick cases of `qlora-kernels bench`: each test checks its case
against the baseline, then times one side of it; ours and the baseline share a group."""

import pytest
import torch

from qlora_kernels.bench.case import Case
from qlora_kernels.bench.timing import warm_cpu_allocations


def pytest_configure(config):
    if not torch.cuda.is_available():
        warm_cpu_allocations()  # as `qlora-kernels bench` does: no first-touch page faults in the timings


@pytest.fixture
def time_case(benchmark):
    def run(case: Case, side: str) -> None:
        case.check()
        benchmark.group = case.label
        benchmark.extra_info["baseline"] = case.baseline_name
        fn = case.sides[side]
        if torch.cuda.is_available():
            benchmark(lambda: (fn(), torch.cuda.synchronize()))
        else:
            benchmark(fn)
    return run
