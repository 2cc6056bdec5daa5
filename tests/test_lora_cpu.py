"""Fused LoRA linear pieces: the C++ NF4 range dequantize, the tiled CPU forward / backward
(backends/lora_cpu.py) against reference.lora + autograd, and (GPU only) the CUDA decode GEMV
through the `_C` binding."""

from __future__ import annotations

import math

from dataclasses import replace

import pytest
import torch

from qlora_kernels import reference
from qlora_kernels._native import native
from qlora_kernels.backends import lora_cpu
from qlora_kernels.nf4 import nf4_quantize
from qlora_kernels.nf4_weight import NF4QuantState, NF4Weight

_C = native()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _nf4(shape, blocksize=64, double_quant=True, dtype=torch.float32, device="cpu"):
    w = torch.randn(shape, dtype=torch.float32).to(dtype)
    packed, state = nf4_quantize(w, blocksize, double_quant=double_quant)
    return NF4Weight(packed, state).to(device)


# ---------------------------------------------------------------------------------------
# range dequantize
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(_C is None, reason="native module not built")
@pytest.mark.parametrize("blocksize", (32, 64, 4096))
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_range_dequantize_is_bit_identical(blocksize, double_quant, dtype):
    shape = (37, 301)  # odd element count, rows not aligned to blocks or bytes
    nf4 = _nf4(shape, blocksize, double_quant)
    full = nf4.dequantize_reference(dtype).flatten()
    n = full.numel()
    gen = torch.Generator().manual_seed(blocksize + double_quant)
    ranges = [(0, n), (0, 1), (n - 1, 1), (1, 2), (blocksize - 1, 3), (blocksize, blocksize), (5, 0),
              (blocksize * 2 + 17, n - blocksize * 2 - 17)]
    for _ in range(40):
        start = int(torch.randint(0, n, (1,), generator=gen))
        count = int(torch.randint(0, n - start + 1, (1,), generator=gen))
        ranges.append((start, count))
    for start, count in ranges:
        if start + count > n:
            continue
        out = lora_cpu.nf4_dequantize_range_cpu(nf4, start, count, dtype)
        expected = full[start:start + count]
        assert out.dtype == dtype and out.shape == (count,)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(out.view(bits), expected.view(bits)), (start, count)


@pytest.mark.skipif(_C is None, reason="native module not built")
def test_range_dequantize_into_buffer_and_bad_ranges():
    nf4 = _nf4((16, 64), 64, True)
    full = nf4.dequantize_reference(torch.bfloat16).flatten()
    buf = torch.full((600,), float("nan"), dtype=torch.bfloat16)
    out = lora_cpu.nf4_dequantize_range_cpu(nf4, 100, 500, torch.bfloat16, buf)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(buf[:500], full[100:600])
    assert torch.isnan(buf[500:]).all()
    with pytest.raises(ValueError):
        lora_cpu.nf4_dequantize_range_cpu(nf4, 1000, 100, torch.float32)
    with pytest.raises(ValueError):
        lora_cpu.nf4_dequantize_range_cpu(nf4, 0, 10, torch.float32, torch.empty(5))
    with pytest.raises(ValueError, match="blocksize=48"):  # refused before any kernel sees it
        lora_cpu.nf4_dequantize_range_cpu(NF4Weight(nf4.packed, replace(nf4.state, blocksize=48)), 0, 10,
                                          torch.float32)


# ---------------------------------------------------------------------------------------
# forward / backward against reference.lora + autograd
# ---------------------------------------------------------------------------------------

M, N, K = 5, 300, 70


def _problem(dtype, kind, rank, with_bias, dropout):
    x = torch.randn(M, K).to(dtype)
    if kind == "dense":
        weight, nf4 = (torch.randn(N, K) / math.sqrt(K)).to(dtype), None
        W = weight
    else:
        weight, nf4 = None, _nf4((N, K), 64, kind == "nf4_dq")
        W = nf4.dequantize_reference(dtype)  # the op's meaning: W dequantized to x's dtype
    A = (torch.randn(rank, K) / math.sqrt(K)).to(dtype)
    B = torch.randn(N, rank).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    p = 0.3 if dropout else 0.0
    keep = (torch.rand(M, K) >= p) if dropout else None
    dy = torch.randn(M, N).to(dtype)
    return x, weight, nf4, W, bias, A, B, keep, p, dy


def _autograd(compute, x, W, bias, A, B, scaling, keep, p, dy):
    """reference.lora.lora_linear in `compute` (fp32 / fp64) with autograd: (y, dx, dA, dB, dbias)."""
    leaves = [t.detach().to(compute).requires_grad_() if t is not None else None for t in (x, A, B, bias)]
    xr, Ar, Br, br = leaves
    y = reference.lora.lora_linear(xr, W.to(compute), br, Ar, Br, scaling, keep, p)
    y.backward(dy.to(compute))
    return y.detach(), xr.grad, Ar.grad, Br.grad, None if br is None else br.grad


def _low_precision(x, W, bias, A, B, scaling, keep, p, dy):
    """The same computation composed of plain torch ops in x's dtype (what PEFT runs)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, A, B, bias)]
    xr, Ar, Br, br = leaves
    dropped = xr if keep is None else xr * keep / (1.0 - p)
    y = xr @ W.t()
    if br is not None:
        y = y + br
    y = y + scaling * ((dropped @ Ar.t()) @ Br.t())
    y.backward(dy)
    return y.detach(), xr.grad, Ar.grad, Br.grad, None if br is None else br.grad


def _ours(x, weight, nf4, bias, A, B, scaling, keep, p, dy, tile_rows):
    y, xa = lora_cpu.lora_forward_cpu(x, weight, nf4, bias, A, B, scaling, keep, p, tile_rows=tile_rows)
    dx, dA, dB, dbias = lora_cpu.lora_backward_cpu(dy, x, weight, nf4, A, B, scaling, keep, p, xa,
                                                   tile_rows=tile_rows)
    return y, xa, dx, dA, dB, dbias


NAMES = ("y", "dx", "dA", "dB", "dbias")


@pytest.mark.parametrize("kind", ("dense", "nf4", "nf4_dq"))
@pytest.mark.parametrize("rank", (1, 8))
@pytest.mark.parametrize("with_bias", (True, False))
@pytest.mark.parametrize("dropout", (False, True))
@pytest.mark.parametrize("tile_rows", (None, 64, 7))
def test_fp32_matches_reference(kind, rank, with_bias, dropout, tile_rows):
    x, weight, nf4, W, bias, A, B, keep, p, dy = _problem(torch.float32, kind, rank, with_bias, dropout)
    scaling = 0.75
    y, xa, dx, dA, dB, dbias = _ours(x, weight, nf4, bias, A, B, scaling, keep, p, dy, tile_rows)
    ref = _autograd(torch.float32, x, W, bias, A, B, scaling, keep, p, dy)
    dropped = x if keep is None else x * keep / (1 - p)
    torch.testing.assert_close(xa, dropped @ A.t(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(NAMES, (y, dx, dA, dB, dbias), ref):
        if want is None:
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("kind", ("dense", "nf4", "nf4_dq"))
@pytest.mark.parametrize("rank", (1, 8))
@pytest.mark.parametrize("with_bias", (True, False))
@pytest.mark.parametrize("dropout", (False, True))
@pytest.mark.parametrize("tile_rows", (None, 64))
def test_half_precision_is_as_accurate_as_plain_torch(dtype, kind, rank, with_bias, dropout, tile_rows):
    """Error against an fp64 reference at most twice that of the same math in plain torch ops
    in `dtype` (plus a sliver of the output's scale)."""
    x, weight, nf4, W, bias, A, B, keep, p, dy = _problem(dtype, kind, rank, with_bias, dropout)
    scaling = 2.0
    ours = _ours(x, weight, nf4, bias, A, B, scaling, keep, p, dy, tile_rows)
    y, xa, dx, dA, dB, dbias = ours
    exact = _autograd(torch.float64, x, W, bias, A, B, scaling, keep, p, dy)
    plain = _low_precision(x, W, bias, A, B, scaling, keep, p, dy)
    assert xa.dtype == dtype and xa.shape == (M, rank)
    for name, got, want, low in zip(NAMES, (y, dx, dA, dB, dbias), exact, plain):
        if want is None:
            continue
        assert got.dtype == dtype and got.shape == want.shape, name
        err = (got.double() - want).abs().max().item()
        err_plain = (low.double() - want).abs().max().item()
        eps = 1e-3 * want.abs().max().item()
        assert err <= 2 * err_plain + eps, f"{name}: error {err:.3g} vs plain {dtype} {err_plain:.3g}"


def test_dense_and_nf4_agree_and_bad_arguments():
    x, _, nf4, W, bias, A, B, _, _, dy = _problem(torch.bfloat16, "nf4", 4, True, False)
    y_nf4, _ = lora_cpu.lora_forward_cpu(x, None, nf4, bias, A, B, 1.0, None, 0.0, tile_rows=50)
    y_dense, _ = lora_cpu.lora_forward_cpu(x, W, None, bias, A, B, 1.0, None, 0.0)
    assert torch.equal(y_nf4, y_dense) or (y_nf4.float() - y_dense.float()).abs().max() <= 2e-2 * y_dense.abs().max()
    with pytest.raises(ValueError):
        lora_cpu.lora_forward_cpu(x, W, nf4, bias, A, B, 1.0, None, 0.0)
    with pytest.raises(ValueError):
        lora_cpu.lora_forward_cpu(x[:, :-1], None, nf4, bias, A, B, 1.0, None, 0.0)
    with pytest.raises(ValueError):
        lora_cpu.lora_backward_cpu(dy[:, :-1], x, None, nf4, A, B, 1.0, None, 0.0, torch.zeros(M, 4))


@pytest.mark.skipif(_C is None, reason="native module not built")
def test_forward_never_materializes_the_weight():
    """N = K = 4096 NF4: the forward and backward allocate nothing near the 32 MiB of a bf16 W."""
    from torch.profiler import ProfilerActivity, profile

    n = k = 4096
    nf4 = NF4Weight(torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8),
                    NF4QuantState(torch.rand(n * k // 64) + 0.01, (n, k), torch.bfloat16, 64))
    x = torch.randn(4, k, dtype=torch.bfloat16)
    A, B = torch.randn(16, k, dtype=torch.bfloat16), torch.randn(n, 16, dtype=torch.bfloat16)
    full_weight = n * k * 2

    def peak_allocation(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(e.cpu_memory_usage for e in prof.events())

    # the measurement sees a full dequantize (so a pass below is meaningful)
    whole = peak_allocation(lambda: nf4.dequantize_reference(torch.bfloat16))
    assert whole >= full_weight
    y, xa = lora_cpu.lora_forward_cpu(x, None, nf4, None, A, B, 1.0, None, 0.0)
    fwd = peak_allocation(lambda: lora_cpu.lora_forward_cpu(x, None, nf4, None, A, B, 1.0, None, 0.0))
    bwd = peak_allocation(lambda: lora_cpu.lora_backward_cpu(torch.randn_like(y), x, None, nf4, A, B, 1.0, None, 0.0,
                                                             xa))
    tile = lora_cpu.TILE_BYTES  # the one dequantized tile (1024 rows here)
    assert fwd <= min(tile, full_weight // 4), fwd
    assert bwd <= min(tile, full_weight // 4), bwd
    # and the tiles add up to the whole GEMM
    ref = (x.float() @ nf4.dequantize_reference(torch.bfloat16).float().t() + (x.float() @ A.float().t()) @ B.float().t())
    assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.skipif(_C is None, reason="native module not built")
@pytest.mark.parametrize("Mx", (1, 5))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile_rows", (None, 7))
def test_nf4_linear_tiles_match_reference(Mx, dtype, tile_rows):
    """The plain NF4 linear on the tiles (NF4Linear above the GEMV's rows): y = x·Wᵀ + bias and
    dx = dy·W, as accurate as the same math in plain torch ops in `dtype`; the bias untouched."""
    nf4 = _nf4((N, K), 64, True)
    x, dy = torch.randn(Mx, K).to(dtype), torch.randn(Mx, N).to(dtype)
    bias = torch.randn(N).to(dtype)
    kept = bias.clone()
    W = nf4.dequantize_reference(dtype)
    y = lora_cpu.nf4_linear_cpu(x, nf4, bias, tile_rows=tile_rows)
    dx = lora_cpu.nf4_linear_dx_cpu(dy, nf4, tile_rows=tile_rows)
    assert torch.equal(bias, kept)
    for name, got, exact, plain in (("y", y, x.double() @ W.double().t() + bias.double(),
                                     torch.nn.functional.linear(x, W, bias)),
                                    ("dx", dx, dy.double() @ W.double(), dy @ W)):
        assert got.dtype == dtype and got.shape == exact.shape, name
        err = (got.double() - exact).abs().max().item()
        err_plain = (plain.double() - exact).abs().max().item()
        assert err <= 2 * err_plain + 1e-6 * exact.abs().max().item(), f"{name}: {err:.3g} vs plain {err_plain:.3g}"


# ---------------------------------------------------------------------------------------
# CUDA decode GEMV (runs only on a GPU)
# ---------------------------------------------------------------------------------------

needs_gemv = pytest.mark.skipif(
    not torch.cuda.is_available() or _C is None or not hasattr(_C, "lora_gemv_nf4_cuda"),
    reason="needs a CUDA GPU and the CUDA kernels",
)


def _gemv(x, nf4, bias, xa, B, scaling):
    from qlora_kernels.backends.common import dtype_tag

    Mx, Kx = x.shape
    Nw = nf4.shape[0]
    y = torch.empty(Mx, Nw, dtype=x.dtype, device=x.device)
    if nf4.nested_absmax is None:
        nested = (nf4.absmax.data_ptr(), 0, 0, 0, 0)
    else:
        nested = (0, nf4.absmax.data_ptr(), nf4.nested_absmax.data_ptr(), nf4.nested_code.data_ptr(),
                  nf4.offset.data_ptr())
    rank = B.shape[1]
    _C.lora_gemv_nf4_cuda(
        x.data_ptr(), dtype_tag(x.dtype), Mx, Kx, nf4.packed.data_ptr(), *nested, nf4.nested_blocksize,
        nf4.blocksize, Nw, 0 if bias is None else bias.data_ptr(), xa.data_ptr() if rank else 0,
        B.data_ptr() if rank else 0, rank, float(scaling), y.data_ptr(), torch.cuda.current_stream().cuda_stream,
    )
    return y


def _gemv_check(Mx, Kx, Nw, dtype, blocksize, double_quant, with_bias, rank=16):
    dev = "cuda"
    nf4 = _nf4((Nw, Kx), blocksize, double_quant, device=dev)
    x = torch.randn(Mx, Kx, device=dev).to(dtype)
    xa = torch.randn(Mx, rank, device=dev)
    B = torch.randn(Nw, rank, device=dev).to(dtype)
    bias = torch.randn(Nw, device=dev).to(dtype) if with_bias else None
    scaling = 0.5
    y = _gemv(x, nf4, bias, xa, B, scaling)
    torch.cuda.synchronize()
    W = nf4.dequantize_reference(dtype).double()  # the weight values the kernel must use
    ref = x.double() @ W.t() + scaling * (xa.double() @ B.double().t())
    if bias is not None:
        ref = ref + bias.double()
    # fp32 accumulation in another order: ~sqrt(K) fp32 ulps of the row's magnitude, then one rounding
    acc = 4e-6 * math.sqrt(Kx) * (x.double().abs() @ W.abs().t()).max().item()
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    err = (y.double() - ref).abs()
    bound = ulp * ref.abs() + acc
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}"


@pytest.mark.gpu
@needs_gemv
@pytest.mark.parametrize("Mx", (1, 3, 4, 16))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_llama_size(Mx, dtype):
    _gemv_check(Mx, 4096, 4096, dtype, 64, True, True)


@pytest.mark.gpu
@needs_gemv
@pytest.mark.parametrize("Mx,Kx,Nw,blocksize,double_quant,with_bias", [
    (1, 4100, 4096, 64, True, True),     # K % 32 = 4: the masked edge path
    (16, 4100, 1000, 4096, False, False),
    (4, 4097, 4095, 64, True, True),     # odd K and N: N * K odd, the last chunk ends past the bytes
    (1, 11008, 4096, 64, True, False),   # Llama down_proj shape
    (2, 20000, 300, 4096, False, True),  # several K tiles
    (16, 31, 33, 32, False, True),       # K < 32
    (5, 96, 13, 32, True, True),
])
def test_gemv_odd_shapes(Mx, Kx, Nw, blocksize, double_quant, with_bias):
    _gemv_check(Mx, Kx, Nw, torch.bfloat16, blocksize, double_quant, with_bias)


@pytest.mark.gpu
@needs_gemv
def test_gemv_rejects_bad_arguments():
    nf4 = _nf4((64, 64), 64, False, device="cuda")
    x = torch.randn(17, 64, device="cuda")
    xa, B = torch.randn(17, 4, device="cuda"), torch.randn(64, 4, device="cuda")
    with pytest.raises(ValueError):
        _gemv(x, nf4, None, xa, B, 1.0)  # M > 16
    shifted = NF4Weight(nf4.packed[1:1 + 64 * 63 // 2], NF4QuantState(nf4.absmax[:63], (64, 63), torch.float32, 64))
    with pytest.raises(ValueError):  # packed not 16-byte aligned
        _gemv(x[:1, :63].contiguous(), shifted, None, xa[:1], B[:64], 1.0)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.999])
@pytest.mark.parametrize("seed", [0, 1, 2**31 - 2])
def test_native_dropout_mask_is_the_reference_mask(seed, p):
    from qlora_kernels.backends.lora_cpu import dropout_keep_mask_cpu
    from qlora_kernels.reference.lora import dropout_keep_mask

    for M, K in ((1, 1), (3, 5), (64, 96), (517, 333)):
        assert torch.equal(dropout_keep_mask_cpu(seed, p, M, K), dropout_keep_mask(seed, p, (M, K))), (M, K)


def test_dropout_mask_statistics():
    from qlora_kernels.reference.lora import dropout_keep_mask

    n = 1 << 20
    for p in (0.05, 0.1, 0.5):
        keep = dropout_keep_mask(3, p, (n,)).float()
        assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # 5 sigma
    a, b = dropout_keep_mask(3, 0.5, (n,)), dropout_keep_mask(4, 0.5, (n,))
    assert abs((a == b).float().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5  # neighbouring seeds independent
    even, odd = a[0::2].float(), a[1::2].float()  # the two halves of one 64-bit draw
    assert abs((even * odd).mean().item() - 0.25) < 5 * (0.1875 / (n // 2)) ** 0.5
    with pytest.raises(ValueError, match="dropout_p=1.0 must be in"):
        dropout_keep_mask(0, 1.0, (4,))
