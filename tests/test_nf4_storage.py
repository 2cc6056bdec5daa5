"""The public NF4 storage API: bitsandbytes' bytes, storage views, sizes, clear errors."""

import pytest
import torch

import qlora_kernels as qk
from helpers import DTYPES, bnb_dequantize, bnb_quantize, weight


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_bitsandbytes(dtype, quant_storage, double_quant):
    w = weight((48, 192), dtype)  # rows a multiple of 64: see test_nf4_reference (bnb AVX512 bug)
    packed, state = qk.nf4_quantize(w, 64, double_quant, quant_storage)
    bnb_packed, qs = bnb_quantize(w, 64, double_quant, quant_storage)
    assert packed.dtype == bnb_packed.dtype and packed.shape == bnb_packed.shape
    assert torch.equal(packed.view(torch.uint8), bnb_packed.view(torch.uint8))
    assert torch.equal(state.absmax, qs.absmax)
    assert state.shape == qs.shape and state.dtype == qs.dtype
    if double_quant:
        assert torch.equal(state.offset, qs.offset)
        assert torch.equal(state.nested_absmax, qs.state2.absmax)
        assert torch.equal(state.nested_code, qs.state2.code)
    for out_dtype in DTYPES:
        want = bnb_dequantize(bnb_packed, qs).to(out_dtype)
        assert torch.equal(qk.nf4_dequantize(packed, state, out_dtype), want)


def test_dequantize_to_other_dtype_follows_bitsandbytes_double_rounding():
    # fp16 weights dequantized for bf16 compute: bitsandbytes rounds to fp16 first
    w = weight((64, 128), torch.float16)
    packed, state = qk.nf4_quantize(w)
    bnb_packed, qs = bnb_quantize(w, 64)
    assert torch.equal(qk.nf4_dequantize(packed, state, torch.bfloat16), bnb_dequantize(bnb_packed, qs).bfloat16())


def test_bits_per_parameter_4096_square():
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    packed, state = qk.nf4_quantize(w, double_quant=True)
    bits = qk.bits_per_parameter(packed, state)
    assert 4.12 < bits <= 4.13
    packed, state = qk.nf4_quantize(w, double_quant=False)
    assert 4.5 <= qk.bits_per_parameter(packed, state) < 4.501


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: qk.nf4_quantize(torch.randn(64, 64).double()), "float64"),
        (lambda: qk.nf4_quantize(torch.randint(0, 5, (64,))), "int64"),
        (lambda: qk.nf4_quantize(torch.randn(64, 64), blocksize=48), "blocksize=48"),
        (lambda: qk.nf4_quantize(torch.randn(64, 64), blocksize=8192), "blocksize=8192"),
        (lambda: qk.nf4_quantize(torch.tensor([1.0, float("nan"), 2.0] * 30)), "NaN/Inf"),
        (lambda: qk.nf4_quantize(torch.tensor([1.0, float("inf")] * 40)), "NaN/Inf"),
        (lambda: qk.nf4_quantize(torch.randn(64), quant_storage=torch.int32), "quant_storage"),
        (lambda: qk.nf4_quantize(torch.randn(3, 3), quant_storage=torch.bfloat16), "cannot be stored as"),
        (lambda: qk.nf4_quantize([1.0, 2.0]), "torch.Tensor"),
    ],
)
def test_bad_input_raises_clearly(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_dequantize_rejects_mismatched_packed():
    packed, state = qk.nf4_quantize(torch.randn(32, 64))
    with pytest.raises(ValueError, match="needs 1024"):
        qk.nf4_dequantize(packed[:-1], state)
