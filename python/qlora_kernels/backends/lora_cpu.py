"""Fused LoRA linear on the CPU without materializing the base weight.

y = x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ (reference/lora.py). An NF4 W is dequantized one
tile of rows at a time (C++ range dequantize, `_C.nf4_dequantize_range_cpu`) into one reused
buffer, and each tile goes straight into a GEMM: the forward fills y[:, tile], the backward
accumulates dx += dy[:, tile] @ W[tile] in fp32. W's values are those of
`reference.nf4_dequantize(..., dtype=x.dtype)`.

Arithmetic: the base GEMMs and the backward's adapter GEMMs run in x's dtype (fp32 for fp16:
CPU fp16 GEMMs are far slower than fp32 ones) with the fp32 accumulation of torch's CPU GEMMs
and one rounding of their output; scaling enters inside the GEMMs (addmm alpha), dx is summed
over the W tiles in fp32, and the forward's xa and LoRA term are computed in fp32 (as the
reference does; xa is returned rounded to x's dtype). The backward makes no fp32 copy of dy or x.

The plain NF4 linear (`nf4_linear_cpu` / `nf4_linear_dx_cpu`: NF4Linear's op above the GEMV's
rows) runs the same tiles without the adapter.

Plain functions; backends/cpu.py registers them as the ops' CPU kernels.
"""

from __future__ import annotations

import threading

import torch

from .._native import native
from ..nf4_weight import NF4Weight
from ..reference.lora import dropout_threshold
from .common import dtype_tag

_C = native()

# Bytes of one W tile in the GEMM dtype (1024 rows of bf16 at K = 4096): smaller tiles cost
# GEMM efficiency (512 x 4096 bf16 tiles ran ~45% slower than one GEMM, 1024-row ones ~18%).
TILE_BYTES = 8 << 20


# One dequantize buffer per dtype and thread, reused by every call: a fresh multi-MB buffer per
# layer call is served by mmap and first-touch page faults, which cost more than the
# dequantize itself (measured in a Llama training step on CPU).
_scratch = threading.local()


def _scratch_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _tile_rows(N: int, K: int, gemm_dtype: torch.dtype, tile_rows: int | None) -> int:
    if tile_rows is None:
        tile_rows = TILE_BYTES // (max(K, 1) * torch.empty((), dtype=gemm_dtype).element_size())
    return max(1, min(N, int(tile_rows)))


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def _on_cpu(nf4: NF4Weight) -> NF4Weight:
    if nf4.device.type != "cpu":
        raise ValueError(f"the NF4 weight is on {nf4.device}; the CPU path needs CPU tensors")
    return nf4


def nf4_dequantize_range_cpu(nf4: NF4Weight, start: int, count: int, dtype: torch.dtype,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat elements [start, start + count) of `nf4`, bit-identical to
    `reference.nf4_dequantize(...).flatten()[start:start + count]` (into `out` when given)."""
    if start < 0 or count < 0 or start + count > nf4.numel:
        raise ValueError(f"range [{start}, {start + count}) is outside a weight of {nf4.numel} elements")
    if out is None:
        out = torch.empty(count, dtype=dtype)
    elif out.dtype != dtype or out.numel() < count or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError("out must be a contiguous CPU tensor of dtype with at least `count` elements")
    _on_cpu(nf4)
    if count == 0:
        return out[:0]
    if _C is None:
        raise RuntimeError("the CPU LoRA path needs the native module qlora_kernels._C (build with pip install .)")
    _C.nf4_dequantize_range_cpu(*nf4.native_pointers(), nf4.nested_blocksize, start, count, nf4.blocksize,
                                out.data_ptr(), dtype_tag(dtype), torch.get_num_threads())
    return out


def dropout_keep_mask_cpu(seed: int, dropout_p: float, M: int, K: int) -> torch.Tensor:
    """Bool [M, K], bit-identical to `reference.lora.dropout_keep_mask(seed, dropout_p, (M, K))`."""
    if _C is None:
        raise RuntimeError("the CPU LoRA path needs the native module qlora_kernels._C (build with pip install .)")
    keep = torch.empty((M, K), dtype=torch.bool)
    _C.dropout_keep_mask_cpu(keep.data_ptr(), M * K, int(seed), dropout_threshold(dropout_p), torch.get_num_threads())
    return keep


class _Tiles:
    """Row tiles [s, e) of W in the GEMM dtype: views of a dense weight, or NF4 rows dequantized
    into one reused buffer (plus a second one when the GEMM dtype differs from x's)."""

    def __init__(self, weight, nf4, N, K, dtype, tile_rows):
        self.weight, self.K, self.dtype = weight, K, dtype
        self.gemm_dtype = _gemm_dtype(dtype)
        self.nf4 = None if nf4 is None else _on_cpu(nf4)
        self.rows = (_tile_rows(N, K, self.gemm_dtype, tile_rows)
                     if nf4 is not None or weight.dtype != self.gemm_dtype else N)
        self.N = N
        self.buffer = self.cast = None

    def __iter__(self):
        for s in range(0, self.N, self.rows):
            e = min(self.N, s + self.rows)
            yield s, e, self.tile(s, e)

    def tile(self, s, e):
        if self.nf4 is None:
            return self.weight[s:e].to(self.gemm_dtype)
        count = (e - s) * self.K
        if self.buffer is None:
            self.buffer = _scratch_buffer(self.rows * self.K, self.dtype)
        w = nf4_dequantize_range_cpu(self.nf4, s * self.K, count, self.dtype, self.buffer)[:count].view(e - s, self.K)
        if self.gemm_dtype == self.dtype:
            return w
        if self.cast is None:
            self.cast = _scratch_buffer(self.rows * self.K, self.gemm_dtype)
        return self.cast[:count].view(e - s, self.K).copy_(w)


def _shapes(x2d, weight, nf4_state):
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D, got shape {tuple(x2d.shape)}")
    if (weight is None) == (nf4_state is None):
        raise ValueError("pass exactly one of weight (dense) and nf4_state (NF4)")
    N, K = (tuple(weight.shape) if weight is not None else tuple(nf4_state.shape))
    if x2d.shape[1] != K:
        raise ValueError(f"x has {x2d.shape[1]} features, the weight expects {K}")
    return x2d.shape[0], N, K


def _dropped(xf: torch.Tensor, keep: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    return xf if keep is None else xf * keep.to(xf.dtype) / (1.0 - dropout_p)


def lora_forward_cpu(x2d, weight, nf4_state, bias, lora_A, lora_B, scaling, keep, dropout_p, *, tile_rows=None):
    """(y [M, N] in x's dtype, xa = dropout(x)·Aᵀ [M, r] in x's dtype).

    `weight`: dense [N, K] or None; `nf4_state`: an `NF4Weight` or None. `keep`: bool [M, K]
    keep mask or None (no dropout). W is never materialized whole:
    at most `tile_rows` rows of it (default: TILE_BYTES of the GEMM dtype) exist at once.
    """
    M, N, K = _shapes(x2d, weight, nf4_state)
    dtype = x2d.dtype
    tiles = _Tiles(weight, nf4_state, N, K, dtype, tile_rows)
    g = tiles.gemm_dtype
    # xa and the LoRA term in fp32 (as the reference): y starts as bias + scaling·xa·Bᵀ rounded
    # once, and the base GEMMs accumulate on top
    xa = torch.mm(_dropped(x2d.float(), keep, dropout_p), lora_A.float().t())  # [M, r]
    y = torch.addmm(xa.new_empty(()) if bias is None else bias.float(), xa, lora_B.float().t(),
                    beta=0 if bias is None else 1, alpha=scaling).to(g)
    xg = x2d.to(g)
    for s, e, w in tiles:
        y[:, s:e].addmm_(xg, w.t())
    return y.to(dtype), xa.to(dtype)


def lora_backward_cpu(dy2d, x2d, weight, nf4_state, lora_A, lora_B, scaling, keep, dropout_p, xa, *,
                      tile_rows=None):
    """(dx, dA, dB, dbias) of `lora_forward_cpu` for the upstream gradient dy [M, N].

    dx = dy·W + keep/(1-p)·scaling·(dy·B)·A (dy·W tile by tile over W's rows, accumulated in
    fp32); dA = scaling·(dy·B)ᵀ·dropout(x); dB = scaling·dyᵀ·xa; dbias = Σ_m dy. dx in x's
    dtype, dA / dB in lora_A's / lora_B's, dbias in dy's.
    """
    M, N, K = _shapes(x2d, weight, nf4_state)
    if dy2d.shape != (M, N):
        raise ValueError(f"dy must be [{M}, {N}], got {tuple(dy2d.shape)}")
    dtype = x2d.dtype
    tiles = _Tiles(weight, nf4_state, N, K, dtype, tile_rows)
    g = tiles.gemm_dtype
    dyg = dy2d.to(g)
    # the adapter GEMMs are tiny; scaling is applied inside them (alpha), before their rounding
    dyb = torch.addmm(dyg.new_empty(()), dyg, lora_B.to(g), beta=0, alpha=scaling)  # scaling·dy·B [M, r]
    dA = torch.mm(dyb.t(), _dropped(x2d.to(g), keep, dropout_p))
    dB = torch.addmm(dyg.new_empty(()), dyg.t(), xa.to(g), beta=0, alpha=scaling)
    dbias = dy2d.sum(0, dtype=torch.float32)
    dx = dyb.float() @ lora_A.float()  # fp32 accumulator of dx [M, K]
    if keep is not None:
        dx = dx * keep.to(dx.dtype) / (1.0 - dropout_p)
    _add_dy_w(dx, dyg, tiles)
    return dx.to(dtype), dA.to(lora_A.dtype), dB.to(lora_B.dtype), dbias.to(dy2d.dtype)


def _add_dy_w(dx: torch.Tensor, dyg: torch.Tensor, tiles: _Tiles) -> None:
    """dx [M, K] (fp32) += dy·W, one GEMM per tile of W's rows."""
    if tiles.gemm_dtype == torch.float32:
        for s, e, w in tiles:
            dx.addmm_(dyg[:, s:e], w)
    else:
        # bf16 GEMM per tile (fp32 accumulation inside, one rounding), partials summed in fp32
        partial = torch.empty(dx.shape, dtype=tiles.gemm_dtype)
        for s, e, w in tiles:
            dx.add_(torch.mm(dyg[:, s:e], w, out=partial))


def nf4_linear_cpu(x2d, nf4_state, bias, *, tile_rows=None):
    """y = x·Wᵀ + bias [M, N] in x's dtype (the `nf4_linear` op at M above the GEMV's rows), W in
    tiles of at most `tile_rows` rows in the reused buffer, each tile's GEMM adding into y."""
    M, N, K = _shapes(x2d, None, nf4_state)
    tiles = _Tiles(None, nf4_state, N, K, x2d.dtype, tile_rows)
    g = tiles.gemm_dtype
    xg = x2d.to(g)
    y = torch.empty((M, N), dtype=g)
    if bias is not None:  # it enters each GEMM's epilogue (beta 1), as in F.linear
        y.copy_(bias)
    for s, e, w in tiles:
        y[:, s:e].addmm_(xg, w.t(), beta=0 if bias is None else 1)
    return y.to(x2d.dtype)


def nf4_linear_dx_cpu(dy2d, nf4_state, *, tile_rows=None):
    """dx = dy·W [M, K] in dy's dtype (the `nf4_linear_bwd` op), tile by tile as `nf4_linear_cpu`,
    the tiles' products summed in fp32."""
    N, K = nf4_state.shape
    if dy2d.dim() != 2 or dy2d.shape[1] != N:
        raise ValueError(f"dy must be [M, {N}], got {tuple(dy2d.shape)}")
    tiles = _Tiles(None, nf4_state, N, K, dy2d.dtype, tile_rows)
    dx = torch.zeros((dy2d.shape[0], K), dtype=torch.float32)
    _add_dy_w(dx, dy2d.to(tiles.gemm_dtype), tiles)
    return dx.to(dy2d.dtype)
