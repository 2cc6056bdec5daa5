"""The launch options the Triton kernels get."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qlora_kernels.triton import lora  # noqa: E402


@pytest.fixture
def restore_matmul_precision():
    legacy = torch.get_float32_matmul_precision()
    precision = torch.backends.cuda.matmul.fp32_precision
    yield
    # legacy setter first: it overwrites the per-backend value, which then goes back as found
    torch.set_float32_matmul_precision(legacy)
    torch.backends.cuda.matmul.fp32_precision = precision


@pytest.mark.parametrize(("set_precision", "expected"), [
    (lambda: None, "ieee"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "ieee"),
    (lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    (lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
], ids=("default", "fp32_precision-tf32", "fp32_precision-ieee", "legacy-high", "legacy-highest"))
def test_fp32_dots_follow_torch_matmul_precision(restore_matmul_precision, set_precision, expected):
    set_precision()
    assert lora._launch_flags(torch.ones(1))["DOT_PRECISION"] == expected
    assert lora._launch_flags(torch.ones(1, dtype=torch.bfloat16))["DOT_PRECISION"] is None


def test_fp32_lora_with_tf32_set_through_fp32_precision(restore_matmul_precision):
    # transformers' TrainingArguments(tf32=True) sets TF32 this way; torch's legacy
    # `allow_tf32` then raises when read
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    M, N, K, r = 5, 37, 70, 8
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * K**-0.5
    lora_A, lora_B = torch.randn(r, K, generator=g) * K**-0.5, torch.randn(N, r, generator=g)
    dy = torch.randn(M, N, generator=g)
    x, w, lora_A, lora_B, dy = (t.to(device) for t in (x, w, lora_A, lora_B, dy))
    y, xa = lora.lora_forward_triton(x, w, None, None, lora_A, lora_B, 2.0, 0.0, 1)
    dx, _, _, _ = lora.lora_backward_triton(dy, x, w, None, lora_A, lora_B, 2.0, 0.0, 1, xa, True, True, True, False)
    x64, w64, a64, b64, dy64 = (t.double() for t in (x, w, lora_A, lora_B, dy))
    # TF32 keeps 10 mantissa bits: a relative error of about 2**-11 per product
    assert torch.allclose(y.double(), x64 @ w64.t() + 2.0 * (x64 @ a64.t()) @ b64.t(), rtol=0, atol=1e-2)
    assert torch.allclose(dx.double(), dy64 @ w64 + 2.0 * (dy64 @ b64) @ a64, rtol=0, atol=1e-2)
