"""nf4_dequantize(..., out=): the values of a fresh dequantize written into a given buffer by the
C++ kernel, the Triton kernel (interpreter) and the reference; bad buffers refused; the write
seen by torch.compile."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.backends import cuda, triton_on_cpu
from qlora_kernels.nf4_weight import NF4Weight

from helpers import weight

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", (True, False))
@pytest.mark.parametrize("shape, blocksize", (((37, 129), 64), ((3, 4096 + 17), 4096), ((1, 1), 32)))
def test_out_is_bit_equal_to_a_fresh_dequantize(dtype, double_quant, shape, blocksize):
    packed, state = qk.nf4_quantize(weight(shape, dtype), blocksize, double_quant)
    fresh = qk.nf4_dequantize(packed, state)
    out = torch.full(shape, float("nan"), dtype=dtype)
    assert qk.nf4_dequantize(packed, state, out=out) is out
    assert torch.equal(_bits(out), _bits(fresh))
    # the Triton kernel, as the CUDA backend and QLORA_KERNELS_TRITON_ON_CPU register it (interpreter)
    args = (*NF4Weight(packed, state).op_args(), list(shape), out)
    for implementation in (cuda.cuda_nf4_dequantize_out, triton_on_cpu.nf4_dequantize_out_triton_cpu):
        out.fill_(float("nan"))
        implementation(*args)
        assert torch.equal(_bits(out), _bits(fresh)), implementation.__name__


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_out_in_another_dtype_than_the_weights(dtype):
    """dtype differs from state.dtype (fp16 <-> bf16): bitsandbytes' route through state.dtype."""
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    packed, state = qk.nf4_quantize(weight((16, 64), other), 64)
    out = torch.empty(16, 64, dtype=dtype)
    qk.nf4_dequantize(packed, state, dtype, out=out)
    assert torch.equal(_bits(out), _bits(qk.nf4_dequantize(packed, state, dtype)))


def test_out_into_a_view_of_a_larger_buffer():
    packed, state = qk.nf4_quantize(weight((24, 96)), 64)
    buffer = torch.full((5000,), -7.0, dtype=torch.bfloat16)
    out = buffer[100:100 + 24 * 96].view(24, 96)
    qk.nf4_dequantize(packed, state, torch.bfloat16, out=out)
    assert torch.equal(out, qk.nf4_dequantize(packed, state, torch.bfloat16))
    assert (buffer[:100] == -7).all() and (buffer[100 + 24 * 96:] == -7).all()


def test_bad_out_raises():
    packed, state = qk.nf4_quantize(weight((24, 96)), 64)
    cases = [
        (torch.empty(96, 24), r"out has shape \[96, 24\] \(the weight's is \[24, 96\]\)"),
        (torch.empty(24, 96, dtype=torch.bfloat16), r"out has dtype torch.bfloat16, the requested dtype is "
                                                    r"torch.float32"),
        (torch.empty(96, 24).t(), r"out has strides \(1, 24\) \(it must be contiguous\)"),
        (torch.empty(24, 96, device="meta"), r"out has device meta \(the weight is on cpu\)"),
        (torch.empty(24, 96, dtype=torch.float64), r"out has dtype torch.float64 \(allowed"),
    ]
    for out, match in cases:
        with pytest.raises(ValueError, match=match):
            qk.nf4_dequantize(packed, state, out=out)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        qk.nf4_dequantize(packed, state, out=[0.0])


def test_out_overlapping_the_weight_raises():
    """The kernel would overwrite the bytes it reads: refused before it runs."""
    packed, state = qk.nf4_quantize(weight((24, 96)), 64, double_quant=False)
    n = packed.numel()
    memory = torch.zeros(24 * 96 * 4, dtype=torch.uint8)
    memory[-n:] = packed.view(-1)
    overlapping = memory.view(torch.float32).view(24, 96)
    with pytest.raises(ValueError, match="out overlaps the weight's packed"):
        qk.nf4_dequantize(memory[-n:], state, out=overlapping)
    with pytest.raises(ValueError, match="out overlaps the weight's absmax"):
        qk.nf4_dequantize(packed, state.with_tensors(absmax=overlapping.view(-1)[:state.absmax.numel()]),
                          out=overlapping)


def test_out_under_torch_compile():
    packed, state = qk.nf4_quantize(weight((24, 96)), 64)
    want = qk.nf4_dequantize(packed, state, torch.bfloat16)

    def fill(buffer):
        out = buffer[8:8 + 24 * 96].view(24, 96)
        qk.nf4_dequantize(packed, state, torch.bfloat16, out=out)
        return out.float().sum()

    compiled = torch.compile(fill, fullgraph=True, backend="aot_eager")
    buffer = torch.zeros(24 * 96 + 16, dtype=torch.bfloat16)
    total = compiled(buffer)
    assert torch.equal(buffer[8:8 + 24 * 96].view(24, 96), want)  # the write reached the caller's buffer
    assert total == want.float().sum()
    assert (buffer[:8] == 0).all() and (buffer[-8:] == 0).all()
