"""Triton rotary embeddings: q and k rotated together in one launch, forward or backward.

Meaning: `qlora_kernels.reference.rope.rotate` (fp32 math, one rounding per element); the
layouts and the backward's transposed rotation are those of `ops/rope.py`. A program takes one
token (b, s) and a block of heads of q or of k (grid axis 1 runs over q's head blocks, then
k's): it loads the token's cos / sin halves once, as fp32, and rotates BLOCK_H rows of the
head dim with them; columns from rotary_dim on are copied (Phi-3's partial rotary).

The launch turns FMA contraction off (`enable_fp_fusion=False`): `x1 * c1 - x2 * s1` then
rounds its products as the reference and transformers do, so fp32 results are theirs bit
for bit. The kernel is memory-bound; the separate multiply costs nothing measurable.
Under the interpreter bf16 outputs are rounded on the bits (`_cast_rn`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_kernels.triton._common import _cast_rn, _interpreting

__all__ = ["rope_triton"]

# Rows of the head dim a program rotates: enough work per program to hide the cos / sin load,
# few enough that a GQA model's k heads (often 8) fill one block without masking most lanes.
MAX_BLOCK_H = 16


@triton.jit
def _rotate_heads(x_ptr, y_ptr, b, s, h0, heads, sx_b, sx_h, sx_s, sy_b, sy_h, sy_s, c1, c2, s1, s2,
                  HALF: tl.constexpr, ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_PASS: tl.constexpr, BLOCK_H: tl.constexpr, NV_PTX: tl.constexpr):
    """Rows h0 .. h0 + BLOCK_H - 1 (those < heads) of token (b, s): y = rotation of x."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < heads)[:, None] & (offs_i < HALF)[None, :]
    x_rows = x_ptr + b * sx_b + s * sx_s + offs_h[:, None].to(tl.int64) * sx_h
    y_rows = y_ptr + b * sy_b + s * sy_s + offs_h[:, None].to(tl.int64) * sy_h
    x1 = tl.load(x_rows + offs_i[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + HALF + offs_i[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    dtype = y_ptr.dtype.element_ty
    tl.store(y_rows + offs_i[None, :], _cast_rn(y1, dtype, NV_PTX), mask=mask)
    tl.store(y_rows + HALF + offs_i[None, :], _cast_rn(y2, dtype, NV_PTX), mask=mask)
    if BLOCK_PASS > 0:
        offs_p = ROTARY_DIM + tl.arange(0, BLOCK_PASS)
        pmask = (offs_h < heads)[:, None] & (offs_p < HEAD_DIM)[None, :]
        tl.store(y_rows + offs_p[None, :], tl.load(x_rows + offs_p[None, :], mask=pmask, other=0.0), mask=pmask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, seqlen, heads_q, heads_k,
                 sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
                 sc_b, sc_s, ss_b, ss_s,
                 HALF: tl.constexpr, ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_PASS: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr, NV_PTX: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    b = token // seqlen
    s = token % seqlen
    offs_i = tl.arange(0, BLOCK_HALF)
    imask = offs_i < HALF
    cos_row = cos_ptr + b * sc_b + s * sc_s
    sin_row = sin_ptr + b * ss_b + s * ss_s
    c1 = tl.load(cos_row + offs_i, mask=imask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + offs_i, mask=imask, other=0.0).to(tl.float32)
    lo = tl.load(sin_row + offs_i, mask=imask, other=0.0).to(tl.float32)
    hi = tl.load(sin_row + HALF + offs_i, mask=imask, other=0.0).to(tl.float32)
    if BACKWARD:
        # the transpose: y1 = x1 c1 + x2 s_hi, y2 = x2 c2 - x1 s_lo (negation is exact)
        s1 = -hi
        s2 = -lo
    else:
        s1 = lo
        s2 = hi
    q_blocks = tl.cdiv(heads_q, BLOCK_H)
    if block < q_blocks:
        _rotate_heads(q_ptr, qo_ptr, b, s, block * BLOCK_H, heads_q, sq_b, sq_h, sq_s, sqo_b, sqo_h, sqo_s,
                      c1, c2, s1, s2, HALF, ROTARY_DIM, HEAD_DIM, BLOCK_HALF, BLOCK_PASS, BLOCK_H, NV_PTX)
    else:
        _rotate_heads(k_ptr, ko_ptr, b, s, (block - q_blocks) * BLOCK_H, heads_k, sk_b, sk_h, sk_s, sko_b, sko_h,
                      sko_s, c1, c2, s1, s2, HALF, ROTARY_DIM, HEAD_DIM, BLOCK_HALF, BLOCK_PASS, BLOCK_H, NV_PTX)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # the kernel reads the head dim (and cos / sin rows) unit-stride; transformers' views have it
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _bhs(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
                k_out: torch.Tensor, backward: bool) -> None:
    """Write the rotation (or its transpose) of q and k into q_out and k_out, one launch.

    Arguments as `ops.rope.check_args` validated them: q [B, Hq, S, D], k [B, Hk, S, D], cos / sin
    [B or 1, S, rotary_dim]; q_out / k_out like q / k with a unit-stride head dim."""
    q, k, cos, sin = (_unit_last(t) for t in (q, k, cos, sin))
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    rotary_dim = cos.shape[-1]
    if B * S == 0 or Hq + Hk == 0:
        return
    half = rotary_dim // 2
    block_h = min(MAX_BLOCK_H, triton.next_power_of_2(max(Hq, Hk)))
    # a broadcast batch of cos / sin is read through a zero stride
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    sin_b = sin.stride(0) if sin.shape[0] > 1 else 0
    pass_cols = D - rotary_dim
    nv_ptx = q.device.type == "cuda" and torch.version.hip is None and not _interpreting()
    grid = (B * S, triton.cdiv(Hq, block_h) + triton.cdiv(Hk, block_h))
    _rope_kernel[grid](
        q, k, q_out, k_out, cos, sin, S, Hq, Hk, *_bhs(q), *_bhs(k), *_bhs(q_out), *_bhs(k_out),
        cos_b, cos.stride(1), sin_b, sin.stride(1),
        HALF=half, ROTARY_DIM=rotary_dim, HEAD_DIM=D, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_PASS=triton.next_power_of_2(pass_cols) if pass_cols else 0, BLOCK_H=block_h,
        BACKWARD=bool(backward), NV_PTX=nv_ptx, num_warps=4, enable_fp_fusion=False,
    )
