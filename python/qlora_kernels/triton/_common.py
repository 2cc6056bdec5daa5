"""What more than one Triton kernel module uses, defined once.

* Interpreter detection, and casts / dots that give the GPU's results under the interpreter
  too (TRITON_INTERPRET=1). Its fp32 -> bf16 cast truncates (checked in Triton 3.9) where
  NVIDIA's cvt.rn rounds to nearest even, so `_cast_rn` rounds on the bits there; its
  `tl.dot` gives wrong results on bf16 operands, so `_dot` upcasts them (exact for
  fp16/bf16 values).
* The attention pieces that the prefill kernels (`flash_attention`) and decode
  (`flash_decode`) share: head-dim row tiles, a sequence's offsets, the masked base-2
  scores and the forward's online-softmax loop, so that both compute a row's softmax with
  the same operations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _cast_rn(x, dtype: tl.constexpr, NV_PTX: tl.constexpr):
    """fp32 -> `dtype`, round to nearest even; without NV_PTX (the interpreter) bf16 is
    rounded on the bits, since the interpreter's own cast truncates."""
    if NV_PTX or dtype != tl.bfloat16:
        y = x.to(dtype)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        # the carry above would turn a NaN with a low payload into inf
        y = tl.where(x != x, x.to(tl.bfloat16), y)
    return y


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x -> dtype, rounding to nearest even like the GPU does, also under the interpreter."""
    if INTERPRET:
        y = _cast_rn(x, dtype, False)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32-accumulated a @ b (operands upcast under the interpreter, see the module doc)."""
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a, b, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _tanh(x):
    # through exp2 (one ex2.approx on NVIDIA): libdevice's tanh does not run under the
    # interpreter. exp2(-2|x| log2 e) stays in (0, 1], so nothing overflows; the fast
    # division (2 ulp) has no slow path, whose call frame would cost local memory.
    t = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    y = tl.fdiv(1.0 - t, 1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _load_rows(base, rows, stride_row, seqlen, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[len(rows), BLOCK_D] tile; rows past `seqlen` and columns past HEAD_DIM read 0."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * stride_row + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_rows_t(base, rows, stride_row, seqlen, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The transposed tile, [BLOCK_D, len(rows)], ready as the right operand of a dot."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_d < HEAD_DIM)[:, None] & (rows < seqlen)[None, :]
    return tl.load(base + offs_d[:, None] + rows[None, :] * stride_row, mask=mask, other=0.0)


@triton.jit
def _sequence(cu_seqlens, cu_seqlens_k, seq, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first query row, first key row, seqlen_q, seqlen_k) of sequence `seq`; dense
    tensors start at row 0."""
    if IS_VARLEN:
        start_q = tl.load(cu_seqlens + seq).to(tl.int64)
        seqlen_q = (tl.load(cu_seqlens + seq + 1).to(tl.int64) - start_q).to(tl.int32)
        start_k = tl.load(cu_seqlens_k + seq).to(tl.int64)
        seqlen_k = (tl.load(cu_seqlens_k + seq + 1).to(tl.int64) - start_k).to(tl.int32)
    else:
        start_q = tl.zeros([], dtype=tl.int64)
        start_k = tl.zeros([], dtype=tl.int64)
    return start_q, start_k, seqlen_q, seqlen_k


@triton.jit
def _scores(qk, pos_q, pos_k, seqlen_k, qk_scale, softcap2, slope2, window_left, window_right, mask_base,
            stride_mn, MASK: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
            HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr):
    """(base-2 scores, softcap's tanh) from raw q.k: scale (and cap), ALiBi, then -inf
    where a key may not be seen. The tanh is what the backward's dS needs (q.k without
    softcap, unused).

    `pos_q` (query positions, i + Sk - Sq) and `pos_k` (key indices) broadcast against
    `qk`, so the same code serves [queries, keys] and transposed [keys, queries] tiles;
    `slope2` is a scalar or broadcasts likewise (decode's rows span several heads).
    MASK adds the window (causal: right = 0) and sequence-end masks; blocks every row sees
    entirely skip them.
    """
    if SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * softcap2
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        s -= slope2 * tl.abs(pos_k - pos_q).to(tl.float32)
    if MASK:
        keep = pos_k < seqlen_k
        if RIGHT:
            keep = keep & (pos_k <= pos_q + window_right)
        if LEFT:
            keep = keep & (pos_k >= pos_q - window_left)
        s = tl.where(keep, s, float("-inf"))
    if HAS_KPM:
        attend = tl.load(mask_base + pos_k * stride_mn, mask=pos_k < seqlen_k, other=0)
        s = tl.where(attend != 0, s, float("-inf"))
    return s, t


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn, lo, hi,
               pos_q, seqlen_k, qk_scale, softcap2, slope2, window_left, window_right,
               MASK: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """The online softmax of rows at positions `pos_q` over keys [lo, hi), folded into the
    running (acc, m_i, l_i). Keys at or past `seqlen_k` are neither read nor seen."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_t = _load_rows_t(k_base, cols, stride_kn, seqlen_k, HEAD_DIM, BLOCK_D)
        s, _ = _scores(_dot(q, k_t, INPUT_PRECISION, INTERPRET), pos_q[:, None], cols[None, :], seqlen_k,
                       qk_scale, softcap2, slope2, window_left, window_right, mask_base, stride_mn,
                       MASK, LEFT, RIGHT, SOFTCAP, HAS_ALIBI, HAS_KPM)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, cols, stride_vn, seqlen_k, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERPRET), v, INPUT_PRECISION, INTERPRET)
        m_i = m_new
    return acc, m_i, l_i


def _interpreting() -> bool:
    # triton.jit picks the interpreter when a function is defined, so ask one of ours
    return not isinstance(_cast_rn, JITFunction)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # the kernels assume a unit head-dim stride (vector loads); HF's transposed views have it
    return t if t.stride(-1) == 1 else t.contiguous()
