"""Flash attention (causal GQA, sliding window, ALiBi, decode), ours vs SDPA: the quick cases of
`qlora-kernels bench attention`."""

import pytest

from qlora_kernels.bench import attention
from qlora_kernels.bench.timing import default_device

CASES = list(attention.cases(default_device(), quick=True))


@pytest.mark.parametrize("side", ["ours", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=[case.label for case in CASES])
def test_attention(time_case, case, side):
    time_case(case, side)
