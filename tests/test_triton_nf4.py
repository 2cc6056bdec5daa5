"""Triton NF4 dequantize vs the reference and vs bitsandbytes, bit for bit."""

import math
import os

import pytest
import torch

# Without a GPU the kernels run in Triton's interpreter, which must be chosen before
# triton (and any @triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qlora_kernels import reference  # noqa: E402
from qlora_kernels.nf4_weight import NF4QuantState, NF4Weight  # noqa: E402
from qlora_kernels.triton.nf4_dequant import nf4_dequantize_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 256, 4096)
SHAPES = ((0,), (1,), (2,), (3,), (63,), (65,), (4096 * 2 + 33,), (37, 96))


def _weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    if flat.numel() > 40:
        flat[:32] = 0  # an all-zero block at blocksize 32 (absmax 0)
        flat[33] = 7.5  # an outlier
    return w


def _quantize(w, blocksize, double_quant):
    packed, absmax = reference.nf4_quantize_blocks(w, blocksize)
    if not double_quant:
        return packed, absmax, {}
    offset = absmax.mean()
    q8, nab = reference.quantize_blockwise_8bit(absmax - offset, reference.dynamic_code(), 256)
    return packed, q8, dict(nested_absmax_=nab, nested_code=reference.dynamic_code(), offset=offset)


def _triton(packed, absmax, blocksize, shape, dtype, nested):
    on = {k: v.to(DEVICE) for k, v in nested.items()}
    state = NF4QuantState(absmax.to(DEVICE), shape, dtype, blocksize, offset=on.get("offset"),
                          nested_absmax=on.get("nested_absmax_"), nested_code=on.get("nested_code"))
    return nf4_dequantize_triton(NF4Weight(packed.to(DEVICE), state), dtype)


@pytest.mark.parametrize("double_quant", (False, True), ids=("plain", "dq"))
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, blocksize, double_quant):
    w = _weight(shape, seed=math.prod(shape) + blocksize)
    packed, absmax, nested = _quantize(w, blocksize, double_quant)
    for dtype in DTYPES:
        want = reference.nf4_dequantize(packed, absmax, blocksize, shape, dtype, **nested)
        got = _triton(packed, absmax, blocksize, shape, dtype, nested)
        assert got.shape == want.shape and got.dtype == dtype and got.device.type == DEVICE
        assert torch.equal(got.cpu(), want), f"{dtype}: {(got.cpu().float() != want.float()).sum()} mismatches"


def test_packed_storage_dtype_is_reinterpreted():
    shape, blocksize = (16, 64), 64
    packed, absmax, _ = _quantize(_weight(shape, seed=3), blocksize, False)
    want = reference.nf4_dequantize(packed, absmax, blocksize, shape, torch.bfloat16)
    got = _triton(packed.view(torch.float16).view(8, -1), absmax, blocksize, shape, torch.bfloat16, {})
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_matches_bitsandbytes(dtype):
    import bitsandbytes.functional as F

    # last dim a multiple of 64: bitsandbytes 0.50 CPU dequantize_4bit (native kernel) does
    # not use flat blocks when it is not, unlike its quantize_4bit and its CUDA kernel
    w = _weight((48, 128), seed=11).to(dtype)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    want = F.dequantize_4bit(packed, qs)
    state = NF4QuantState(qs.absmax, qs.shape, qs.dtype, qs.blocksize, qs.code, offset=qs.offset,
                          nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                          nested_blocksize=qs.state2.blocksize)
    got = nf4_dequantize_triton(NF4Weight(packed, state).to(DEVICE), qs.dtype)
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_large_bf16_cuda():
    shape, blocksize = (4096, 4096), 64
    packed, absmax, nested = _quantize(_weight(shape, seed=5), blocksize, True)
    want = reference.nf4_dequantize(packed, absmax, blocksize, shape, torch.bfloat16, **nested)
    got = _triton(packed, absmax, blocksize, shape, torch.bfloat16, nested)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)
