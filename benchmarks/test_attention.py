"""Flash attention (causal GQA, sliding window, ALiBi, decode), ours vs SDPA: the quick cases of
`qlora-kernels bench attention`."""

import pytest

from qlora_kernels.bench import attention
from qlora_kernels.bench.timing import default_device

CASES = list(attention.cases(default_device(), quick=True))
SIDES = [(case, side) for case in CASES for side in case.sides]  # SDPA's GQA forms are sides of their own


@pytest.mark.parametrize("case, side", SIDES, ids=[f"{case.label}-{side}" for case, side in SIDES])
def test_attention(time_case, case, side):
    time_case(case, side)
