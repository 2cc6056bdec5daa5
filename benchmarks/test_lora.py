"""Fused LoRA linear, ours vs PEFT over nn.Linear and over bitsandbytes Linear4bit: the quick
cases of `qlora-kernels bench lora`."""

import pytest

from qlora_kernels.bench import lora
from qlora_kernels.bench.timing import default_device

CASES = list(lora.cases(default_device(), quick=True))


@pytest.mark.parametrize("side", ["ours", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=[case.label for case in CASES])
def test_lora(time_case, case, side):
    time_case(case, side)
