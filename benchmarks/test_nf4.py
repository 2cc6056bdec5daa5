"""NF4 quantize / dequantize, ours vs bitsandbytes: the quick cases of `qlora-kernels bench nf4`."""

import pytest

from qlora_kernels.bench import nf4
from qlora_kernels.bench.timing import default_device

CASES = list(nf4.cases(default_device(), quick=True))


@pytest.mark.parametrize("side", ["ours", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=[case.label for case in CASES])
def test_nf4(time_case, case, side):
    time_case(case, side)
