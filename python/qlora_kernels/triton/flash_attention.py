"""Triton flash attention (FlashAttention-2): forward and backward, dense and varlen.

Semantics are those of `qlora_kernels.reference.attention` (GQA, bottom-right causal,
in-kernel ALiBi, key_padding_mask, empty rows -> out 0 / lse -inf / zero grads, varlen).

Numerics:

* Base-2 softmax. The launcher folds log2(e) into the score scale (and the kernels into
  the ALiBi slope), so every exponential is one `exp2` (ex2.approx on NVIDIA) rather than
  `exp` = exp2 of a product. Running maxima and the recomputation in the backward live
  in that base-2 domain; lse is converted to the natural log when stored and back (times
  log2(e)) when the backward reads it.
* Matmuls accumulate in fp32. P and dS are cast to the input dtype before their matmuls,
  as FlashAttention does. fp32 inputs use IEEE fp32 dots, not tf32, so the fp32 path
  stays accurate to ~1e-6.
* Empty rows never produce NaN: a row whose running max is still -inf is exponentiated
  against 0 (so p = 0, alpha = 0); at the end l = 0 gives out 0 and lse -inf. The
  backward turns lse = -inf (and rows past the end) into +inf, so the recomputed P is
  exactly 0 there and those rows add nothing to dQ, dK or dV.

Structure. The forward runs one program per (query block, q head, sequence). The
backward (FA2 tutorial style, no atomics at all) is three kernels: delta = rowsum(dO * O);
one program per (key block, kv head, sequence) that loops over the q heads of its GQA
group and their query blocks to own dK/dV; one program per (query block, q head,
sequence) for dQ. Every loop runs in two stages: blocks that need no score mask, then
the causal-diagonal / sequence-end blocks with masks; blocks entirely above the causal
diagonal are never visited.

Layout: kernels take batch, head and sequence strides, so `.transpose(1, 2)` views are
read in place; the head dim must be unit-stride (vectorized loads), and a tensor with
another last stride is copied. Varlen tensors are [T, H, D] with a zero batch stride:
each program finds its sequence's first row in cu_seqlens. Head dims up to 256 are padded
to BLOCK_D (a power of two, >= 16) with masks.

Interpreter (TRITON_INTERPRET=1): its `tl.dot` gives wrong results on bf16 operands and
its fp32 -> bf16 cast truncates, so under the `INTERPRET` constexpr (set by the launcher)
dot operands are upcast to fp32 (exact for fp16/bf16 values) and casts round to nearest
even via `nf4_dequant._cast_rn`, which is what the GPU does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from qlora_kernels.triton.nf4_dequant import _cast_rn

__all__ = ["flash_attention_fwd_triton", "flash_attention_bwd_triton"]

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


# fp16/bf16, keyed by kernel and BLOCK_D. Not timed on hardware: each entry compiles for
# sm_80 and sm_90 (Triton 3.6 and 3.9) without register spills and inside sm_86's 101,376
# bytes of shared memory, with and without ALiBi / key padding / GQA
# (scripts/triton_static_report.py, checked by tests/test_triton_compile.py). sm_80's
# tensor-core dots need more registers than sm_90's, which is what bounds most entries.
# dK/dV keeps K, V and two fp32 accumulators of BLOCK_N x BLOCK_D per program, so it takes
# narrow query steps; a wide key block still cuts the Q / dO traffic per key. dQ is the
# mirror image: a wide query block and narrow key steps.
_CONFIGS = {
    "fwd": {64: _Config(128, 64, 8, 3), 128: _Config(128, 32, 8, 3), 256: _Config(64, 32, 8, 2)},
    "dkdv": {64: _Config(32, 32, 8, 3), 128: _Config(16, 64, 8, 3), 256: _Config(32, 32, 8, 1)},
    "dq": {64: _Config(128, 32, 8, 3), 128: _Config(64, 32, 8, 3), 256: _Config(64, 16, 8, 2)},
}
# fp32 runs IEEE dots on FMA units, whose operands live in registers: small tiles, smaller
# as the head dim grows (a correctness path, not a fast one); checked as above.
_FP32_CONFIGS = {
    "fwd": {64: _Config(32, 32, 8, 2), 128: _Config(32, 16, 8, 2), 256: _Config(32, 16, 8, 2)},
    "dkdv": {64: _Config(16, 32, 8, 2), 128: _Config(16, 16, 8, 2), 256: _Config(16, 16, 8, 1)},
    "dq": {64: _Config(32, 16, 4, 2), 128: _Config(16, 16, 4, 2), 256: _Config(16, 16, 8, 2)},
}
# The interpreter runs tiles as numpy arrays: small tiles keep tests fast, and the
# uneven BLOCK_M / BLOCK_N mirror the GPU tables so the stage boundaries get exercised.
_INTERPRETER_CONFIGS = {"fwd": _Config(32, 16, 1, 1), "dkdv": _Config(16, 32, 1, 1), "dq": _Config(32, 16, 1, 1)}


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32-accumulated a @ b (see module doc for the interpreter upcast)."""
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a, b, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x -> dtype, rounding to nearest even like the GPU does, also under the interpreter."""
    if INTERPRET:
        y = _cast_rn(x, dtype, False)
    else:
        y = x.to(dtype)
    return y


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
def _store_rows(base, tile, rows, stride_row, seqlen, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                INTERPRET: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(base + rows[:, None] * stride_row + offs_d[None, :],
             _cast(tile, base.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _load_lse2(lse_base, rows, stride_lm, seqlen_q):
    """Base-2 lse for P = exp2(s - lse2); empty rows and rows past the end give +inf, so P = 0."""
    lse = tl.load(lse_base + rows * stride_lm, mask=rows < seqlen_q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _sequence(cu_seqlens, seq, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first row, seqlen_q, seqlen_k) of sequence `seq`; dense tensors start at row 0."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens + seq).to(tl.int64)
        end = tl.load(cu_seqlens + seq + 1).to(tl.int64)
        # varlen is self-attention: queries and keys are the same rows
        seqlen_q = (end - start).to(tl.int32)
        seqlen_k = seqlen_q
    else:
        start = tl.zeros([], dtype=tl.int64)
    return start, seqlen_q, seqlen_k


@triton.jit
def _scores(qk, pos_q, pos_k, seqlen_k, qk_scale, slope2, mask_base, stride_mn,
            MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr):
    """Base-2 scores from raw q.k: scale, ALiBi, then -inf where a key may not be seen.

    `pos_q` (query positions, i + Sk - Sq) and `pos_k` (key indices) broadcast against
    `qk`, so the same code serves [queries, keys] and transposed [keys, queries] tiles.
    MASK adds the causal and sequence-end masks; blocks that need neither skip them.
    """
    s = qk * qk_scale
    if HAS_ALIBI:
        s += slope2 * (pos_k - pos_q).to(tl.float32)
    if MASK:
        keep = pos_k < seqlen_k
        if CAUSAL:
            keep = keep & (pos_k <= pos_q)
        s = tl.where(keep, s, float("-inf"))
    if HAS_KPM:
        attend = tl.load(mask_base + pos_k * stride_mn, mask=pos_k < seqlen_k, other=0)
        s = tl.where(attend != 0, s, float("-inf"))
    return s


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """For query rows [start_m, start_m + BLOCK_M): (unmasked_hi, hi) such that keys
    [0, hi) hold every visible key and [0, unmasked_hi), whole BLOCK_N blocks, are visible
    to every row (no mask needed there)."""
    hi = seqlen_k
    unmasked_hi = seqlen_k
    if CAUSAL:
        first_pos = start_m + seqlen_k - seqlen_q
        hi = tl.minimum(hi, tl.maximum(first_pos + BLOCK_M, 0))
        unmasked_hi = tl.minimum(unmasked_hi, tl.maximum(first_pos + 1, 0))
    unmasked_hi = unmasked_hi // BLOCK_N * BLOCK_N
    return unmasked_hi, hi


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn, lo, hi,
               pos_q, seqlen_k, qk_scale, slope2,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_t = _load_rows_t(k_base, cols, stride_kn, seqlen_k, HEAD_DIM, BLOCK_D)
        s = _scores(_dot(q, k_t, INPUT_PRECISION, INTERPRET), pos_q[:, None], cols[None, :], seqlen_k,
                    qk_scale, slope2, mask_base, stride_mn, MASK, CAUSAL, HAS_ALIBI, HAS_KPM)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, cols, stride_vn, seqlen_k, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERPRET), v, INPUT_PRECISION, INTERPRET)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Slopes, KeyMask, cu_seqlens,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm, stride_mb, stride_mn,
    seqlen_q, seqlen_k, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    # int64 bases: batch * stride and the varlen row offset can pass 2**31
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    start, seqlen_q, seqlen_k = _sequence(cu_seqlens, seq, seqlen_q, seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    kv_head = head // group
    q_base = Q + seq * stride_qb + head * stride_qh + start * stride_qm
    k_base = K + seq * stride_kb + kv_head * stride_kh + start * stride_kn
    v_base = V + seq * stride_vb + kv_head * stride_vh + start * stride_vn
    mask_base = KeyMask + seq * stride_mb
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + head) * LOG2E

    rows = start_m + tl.arange(0, BLOCK_M)
    pos_q = rows + (seqlen_k - seqlen_q)
    q = _load_rows(q_base, rows, stride_qm, seqlen_q, HEAD_DIM, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    unmasked_hi, hi = _key_range(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                               0, unmasked_hi, pos_q, seqlen_k, qk_scale, slope2, False, CAUSAL, HAS_ALIBI,
                               HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N, INPUT_PRECISION, INTERPRET)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                               unmasked_hi, hi, pos_q, seqlen_k, qk_scale, slope2, True, CAUSAL, HAS_ALIBI,
                               HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N, INPUT_PRECISION, INTERPRET)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o_base = Out + seq * stride_ob + head * stride_oh + start * stride_om
    _store_rows(o_base, acc / l_safe[:, None], rows, stride_om, seqlen_q, HEAD_DIM, BLOCK_D, INTERPRET)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    l_base = Lse + seq * stride_lb + head * stride_lh + start * stride_lm
    tl.store(l_base + rows * stride_lm, lse, mask=rows < seqlen_q)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Delta, cu_seqlens,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
    seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    start, seqlen_q, _ = _sequence(cu_seqlens, seq, seqlen_q, seqlen_q, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    o = _load_rows(Out + seq * stride_ob + head * stride_oh + start * stride_om, rows, stride_om, seqlen_q,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + seq * stride_dob + head * stride_doh + start * stride_dom, rows, stride_dom, seqlen_q,
                    HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    d_base = Delta + seq * stride_lb + head * stride_lh + start * stride_lm
    tl.store(d_base + rows * stride_lm, delta, mask=rows < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, stride_lm,
                    mask_base, stride_mn, lo, hi, cols, seqlen_q, seqlen_k, qk_scale, slope2,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    # Works on transposed [keys, queries] tiles so dK and dV come out of plain dots.
    # Keys past the end are not masked in the unmasked stage: their P may be anything,
    # but it only reaches their own dK/dV rows, which are never stored.
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_t = _load_rows_t(q_base, rows, stride_qm, seqlen_q, HEAD_DIM, BLOCK_D)
        do = _load_rows(do_base, rows, stride_dom, seqlen_q, HEAD_DIM, BLOCK_D)
        lse2 = _load_lse2(lse_base, rows, stride_lm, seqlen_q)
        delta = tl.load(delta_base + rows * stride_lm, mask=rows < seqlen_q, other=0.0)
        pos_q = rows + (seqlen_k - seqlen_q)
        s_t = _scores(_dot(k, q_t, INPUT_PRECISION, INTERPRET), pos_q[None, :], cols[:, None], seqlen_k,
                      qk_scale, slope2, mask_base, stride_mn, MASK, CAUSAL, HAS_ALIBI, HAS_KPM)
        p_t = tl.exp2(s_t - lse2[None, :])
        dv += _dot(_cast(p_t, do.dtype, INTERPRET), do, INPUT_PRECISION, INTERPRET)
        dp_t = _dot(v, tl.trans(do), INPUT_PRECISION, INTERPRET)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(_cast(ds_t, q_t.dtype, INTERPRET), tl.trans(q_t), INPUT_PRECISION, INTERPRET)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, Slopes, KeyMask, cu_seqlens,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_lm, stride_mb, stride_mn,
    seqlen_q, seqlen_k, group, qk_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    start, seqlen_q, seqlen_k = _sequence(cu_seqlens, seq, seqlen_q, seqlen_k, IS_VARLEN)
    if start_n >= seqlen_k:
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K + seq * stride_kb + kv_head * stride_kh + start * stride_kn, cols, stride_kn, seqlen_k,
                   HEAD_DIM, BLOCK_D)
    v = _load_rows(V + seq * stride_vb + kv_head * stride_vh + start * stride_vn, cols, stride_vn, seqlen_k,
                   HEAD_DIM, BLOCK_D)
    mask_base = KeyMask + seq * stride_mb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks from `lo` see some key of this block; from `unmasked_lo` on they see
    # all of them (both on the BLOCK_M grid, so the two stages tile [lo, seqlen_q)).
    lo = 0
    unmasked_lo = 0
    if CAUSAL:
        diag = seqlen_k - seqlen_q
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        unmasked_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
    for g in range(0, group):
        head = kv_head * group + g
        q_base = Q + seq * stride_qb + head * stride_qh + start * stride_qm
        do_base = DO + seq * stride_dob + head * stride_doh + start * stride_dom
        lse_base = Lse + seq * stride_lb + head * stride_lh + start * stride_lm
        delta_base = Delta + seq * stride_lb + head * stride_lh + start * stride_lm
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Slopes + head) * LOG2E
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                 stride_lm, mask_base, stride_mn, lo, unmasked_lo, cols, seqlen_q, seqlen_k,
                                 qk_scale, slope2, True, CAUSAL, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D,
                                 BLOCK_M, INPUT_PRECISION, INTERPRET)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                 stride_lm, mask_base, stride_mn, unmasked_lo, seqlen_q, cols, seqlen_q,
                                 seqlen_k, qk_scale, slope2, False, CAUSAL, HAS_ALIBI, HAS_KPM, HEAD_DIM,
                                 BLOCK_D, BLOCK_M, INPUT_PRECISION, INTERPRET)
    _store_rows(DK + seq * stride_dkb + kv_head * stride_dkh + start * stride_dkn, dk * softmax_scale, cols,
                stride_dkn, seqlen_k, HEAD_DIM, BLOCK_D, INTERPRET)
    _store_rows(DV + seq * stride_dvb + kv_head * stride_dvh + start * stride_dvn, dv, cols, stride_dvn,
                seqlen_k, HEAD_DIM, BLOCK_D, INTERPRET)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn, lo, hi,
                  pos_q, seqlen_k, qk_scale, slope2,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_t = _load_rows_t(k_base, cols, stride_kn, seqlen_k, HEAD_DIM, BLOCK_D)
        v_t = _load_rows_t(v_base, cols, stride_vn, seqlen_k, HEAD_DIM, BLOCK_D)
        s = _scores(_dot(q, k_t, INPUT_PRECISION, INTERPRET), pos_q[:, None], cols[None, :], seqlen_k,
                    qk_scale, slope2, mask_base, stride_mn, MASK, CAUSAL, HAS_ALIBI, HAS_KPM)
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, v_t, INPUT_PRECISION, INTERPRET)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k_t.dtype, INTERPRET), tl.trans(k_t), INPUT_PRECISION, INTERPRET)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta, Slopes, KeyMask, cu_seqlens,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_lm, stride_mb, stride_mn,
    seqlen_q, seqlen_k, group, qk_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    start, seqlen_q, seqlen_k = _sequence(cu_seqlens, seq, seqlen_q, seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    kv_head = head // group
    k_base = K + seq * stride_kb + kv_head * stride_kh + start * stride_kn
    v_base = V + seq * stride_vb + kv_head * stride_vh + start * stride_vn
    mask_base = KeyMask + seq * stride_mb
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + head) * LOG2E

    rows = start_m + tl.arange(0, BLOCK_M)
    pos_q = rows + (seqlen_k - seqlen_q)
    q = _load_rows(Q + seq * stride_qb + head * stride_qh + start * stride_qm, rows, stride_qm, seqlen_q,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + seq * stride_dob + head * stride_doh + start * stride_dom, rows, stride_dom, seqlen_q,
                    HEAD_DIM, BLOCK_D)
    lse_base = Lse + seq * stride_lb + head * stride_lh + start * stride_lm
    lse2 = _load_lse2(lse_base, rows, stride_lm, seqlen_q)
    delta_base = Delta + seq * stride_lb + head * stride_lh + start * stride_lm
    delta = tl.load(delta_base + rows * stride_lm, mask=rows < seqlen_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    unmasked_hi, hi = _key_range(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                       0, unmasked_hi, pos_q, seqlen_k, qk_scale, slope2, False, CAUSAL, HAS_ALIBI, HAS_KPM,
                       HEAD_DIM, BLOCK_D, BLOCK_N, INPUT_PRECISION, INTERPRET)
    # The masked stage must also mask keys past the end: with p = exp2(s - lse2) unbounded
    # there, inf * (zero key) would put NaN into dQ.
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                       unmasked_hi, hi, pos_q, seqlen_k, qk_scale, slope2, True, CAUSAL, HAS_ALIBI, HAS_KPM,
                       HEAD_DIM, BLOCK_D, BLOCK_N, INPUT_PRECISION, INTERPRET)
    _store_rows(DQ + seq * stride_dqb + head * stride_dqh + start * stride_dqm, dq * softmax_scale, rows,
                stride_dqm, seqlen_q, HEAD_DIM, BLOCK_D, INTERPRET)


def _interpreting() -> bool:
    # triton.jit picks the interpreter when the kernel is defined, so ask the kernel
    return not isinstance(_fwd_kernel, JITFunction)


def _config(kind: str, block_d: int, dtype: torch.dtype) -> _Config:
    if _interpreting():
        return _INTERPRETER_CONFIGS[kind]
    table = _FP32_CONFIGS if dtype == torch.float32 else _CONFIGS
    return table[kind][max(64, block_d)]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # the kernels assume a unit head-dim stride (vector loads); HF's transposed views have it
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhm_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, sequence) strides; packed varlen tensors [T, H, D] have no batch stride."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    if varlen:  # [Hq, T]
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


class _Problem(NamedTuple):
    """Validated sizes and the tensors every kernel reads besides q / k / v."""

    varlen: bool
    num_seqs: int
    heads_q: int
    group: int
    seqlen_q: int  # the longest one for varlen
    seqlen_k: int
    block_d: int
    scale: float
    slopes: torch.Tensor
    key_mask: torch.Tensor
    mask_strides: tuple[int, int]
    cu_seqlens: torch.Tensor
    flags: dict


def side_inputs(q, alibi_slopes, key_padding_mask, heads_q, batch, seqlen_k):
    """(slopes, key_mask, mask_strides) as the kernels read them; q stands in for an unused pointer."""
    if alibi_slopes is not None:
        if alibi_slopes.numel() != heads_q:
            raise ValueError(f"alibi_slopes needs {heads_q} values (one per query head)")
        slopes = alibi_slopes.reshape(-1).to(device=q.device, dtype=torch.float32).contiguous()
    else:
        slopes = q
    if key_padding_mask is None:
        return slopes, q, (0, 0)
    if tuple(key_padding_mask.shape) != (batch, seqlen_k):
        raise ValueError(f"key_padding_mask must be [{batch}, {seqlen_k}]")
    # bool and uint8 share a byte, so the mask is read in place
    key_mask = key_padding_mask.to(device=q.device, dtype=torch.bool).view(torch.uint8)
    return slopes, key_mask, (key_mask.stride(0), key_mask.stride(1))


def _problem(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen) -> _Problem:
    varlen = cu_seqlens is not None
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != (3 if varlen else 4) or k.shape != v.shape or k.dim() != q.dim():
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"({'varlen [T, H, D]' if varlen else '[B, H, S, D]'} expected)")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dims q {head_dim}, k {k.shape[-1]}: must match and be in 1..{MAX_HEAD_DIM}")
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"{heads_q} query heads are not a multiple of {heads_kv} kv heads")
    device = q.device
    if varlen:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask does not apply to varlen (cu_seqlens) inputs")
        if k.shape[0] != q.shape[0]:
            raise ValueError("varlen is self-attention: q and k need the same token count")
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
        num_seqs = cu_seqlens.numel() - 1
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if num_seqs > 0 else 0
        seqlen_q = seqlen_k = int(max_seqlen)
    else:
        num_seqs, seqlen_q, seqlen_k = q.shape[0], q.shape[2], k.shape[2]
        if k.shape[0] != num_seqs:
            raise ValueError(f"batch sizes differ: q {num_seqs}, k {k.shape[0]}")
        cu_seqlens = q  # unused pointer
    slopes, key_mask, mask_strides = side_inputs(q, alibi_slopes, key_padding_mask, heads_q, num_seqs, seqlen_k)
    block_d = max(16, triton.next_power_of_2(head_dim))
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=bool(causal), HAS_ALIBI=alibi_slopes is not None,
                 HAS_KPM=key_padding_mask is not None, IS_VARLEN=varlen,
                 INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=_interpreting())
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    return _Problem(varlen, num_seqs, heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, block_d, scale,
                    slopes, key_mask, mask_strides, cu_seqlens, flags)


def flash_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.attention.flash_attention` (and `_varlen` with cu_seqlens).

    Dense: q [B, Hq, Sq, D], k / v [B, Hkv, Sk, D], any batch / head / sequence strides.
    Varlen: q / k / v [T, H, D] and cu_seqlens [N + 1] (max_seqlen: the longest sequence,
    computed from cu_seqlens when None). Returns out (contiguous [B, Hq, Sq, D] or
    [T, Hq, D], q's dtype) and fp32 natural-log lse ([B, Hq, Sq] or [Hq, T]).
    """
    pb = _problem(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if pb.varlen:
        lse = torch.empty((pb.heads_q, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    cfg = _config("fwd", pb.block_d, q.dtype)
    grid = (triton.cdiv(pb.seqlen_q, cfg.BLOCK_M), pb.heads_q, pb.num_seqs)
    _fwd_kernel[grid](
        q, k, v, out, lse, pb.slopes, pb.key_mask, pb.cu_seqlens,
        *_bhm_strides(q, pb.varlen), *_bhm_strides(k, pb.varlen), *_bhm_strides(v, pb.varlen),
        *_bhm_strides(out, pb.varlen), *_lse_strides(lse, pb.varlen), *pb.mask_strides,
        pb.seqlen_q, pb.seqlen_k, pb.group, pb.scale * math.log2(math.e),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pb.flags,
    )
    return out, lse


def flash_attention_bwd_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for `flash_attention_fwd_triton` with the same arguments, given its
    `out` and `lse`. Gradients have their input's shape, dtype and (when dense) strides."""
    pb = _problem(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    # empty_like keeps a dense input's strides (say a transposed view), so the gradient
    # needs no copy on its way back through that view
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty_like(lse)  # same strides as lse, so the kernels share one set
    lse_strides = _lse_strides(lse, pb.varlen)
    qkv_strides = (*_bhm_strides(q, pb.varlen), *_bhm_strides(k, pb.varlen), *_bhm_strides(v, pb.varlen))
    do_strides = _bhm_strides(dout, pb.varlen)
    qk_scale = pb.scale * math.log2(math.e)
    flags = pb.flags

    pre = _config("dq", pb.block_d, q.dtype)
    _bwd_preprocess_kernel[(triton.cdiv(pb.seqlen_q, pre.BLOCK_M), pb.heads_q, pb.num_seqs)](
        out, dout, delta, pb.cu_seqlens, *_bhm_strides(out, pb.varlen), *do_strides, *lse_strides, pb.seqlen_q,
        HEAD_DIM=flags["HEAD_DIM"], BLOCK_D=flags["BLOCK_D"], BLOCK_M=pre.BLOCK_M, IS_VARLEN=pb.varlen,
        num_warps=4,
    )
    cfg = _config("dkdv", pb.block_d, q.dtype)
    _bwd_dkdv_kernel[(triton.cdiv(pb.seqlen_k, cfg.BLOCK_N), pb.heads_q // pb.group, pb.num_seqs)](
        q, k, v, dout, dk, dv, lse, delta, pb.slopes, pb.key_mask, pb.cu_seqlens,
        *qkv_strides, *do_strides, *_bhm_strides(dk, pb.varlen), *_bhm_strides(dv, pb.varlen),
        *lse_strides, *pb.mask_strides, pb.seqlen_q, pb.seqlen_k, pb.group, qk_scale, pb.scale,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    cfg = _config("dq", pb.block_d, q.dtype)
    _bwd_dq_kernel[(triton.cdiv(pb.seqlen_q, cfg.BLOCK_M), pb.heads_q, pb.num_seqs)](
        q, k, v, dout, dq, lse, delta, pb.slopes, pb.key_mask, pb.cu_seqlens,
        *qkv_strides, *do_strides, *_bhm_strides(dq, pb.varlen), *lse_strides, *pb.mask_strides,
        pb.seqlen_q, pb.seqlen_k, pb.group, qk_scale, pb.scale,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    return dq, dk, dv
