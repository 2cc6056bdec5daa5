"""NF4Linear at 1 to 16 tokens, ours vs a bf16 nn.Linear and bitsandbytes' Linear4bit in
inference mode: the quick cases of `qlora-kernels bench decode` (generate() tokens/s is in
`qlora-kernels bench decode` only: whole generate() calls, timed interleaved)."""

import pytest

from qlora_kernels.bench import decode
from qlora_kernels.bench.timing import default_device

CASES = list(decode.cases(default_device(), quick=True))
SIDES = [(case, side) for case in CASES for side in case.sides]


@pytest.mark.parametrize("case, side", SIDES, ids=[f"{case.label}-{side}" for case, side in SIDES])
def test_decode(time_case, case, side):
    time_case(case, side)
