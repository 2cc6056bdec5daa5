"""Triton flash attention (FlashAttention-2): forward and backward, dense and varlen.

Semantics are those of `qlora_kernels.reference.attention` (GQA, bottom-right alignment,
causal mask and sliding window, logit softcap, symmetric ALiBi, attention sinks,
key_padding_mask, varlen with keys packed apart from queries, empty rows -> out 0 /
lse -inf (the sink with sinks) / zero grads, a gradient into lse). The launchers trust
their arguments: `ops.attention.check_args` validated them.

Numerics:

* Base-2 softmax. The launcher folds log2(e) into the score scale (and the kernels into
  the ALiBi slope and the sinks), so every exponential is one `exp2` (ex2.approx on
  NVIDIA) rather than `exp` = exp2 of a product. Running maxima and the recomputation in
  the backward live in that base-2 domain; lse is converted to the natural log when stored
  and back (times log2(e)) when the backward reads it.
* Softcap acts on the natural-log score: the launcher then passes qk_scale = scale /
  softcap, and the kernels compute softcap·log2(e) · tanh(q.k · qk_scale); the backward
  recomputes tanh for dS ⊙= 1 − tanh².
* Sinks: a row's online softmax starts from the sink as if it were one more key with no
  value (m = sink, l = 1), so lse includes it and a row with no key gets out 0, lse = sink.
* Matmuls accumulate in fp32. P and dS are cast to the input dtype before their matmuls,
  as FlashAttention does. fp32 inputs use IEEE fp32 dots, not tf32, so the fp32 path
  stays accurate to ~1e-6.
* Empty rows never produce NaN: a row whose running max is still -inf is exponentiated
  against 0 (so p = 0, alpha = 0); at the end l = 0 gives out 0 and lse -inf. The
  backward turns lse = -inf (and rows past the end) into +inf, so the recomputed P is
  exactly 0 there and those rows add nothing to dQ, dK or dV.

Structure. The forward runs one program per (query block, q head, sequence). The
backward (FA2 tutorial style, no atomics at all) is three kernels: delta = rowsum(dO * O)
- dlse (and each row's sink term exp(sink - lse) · delta, summed into dsinks by torch);
one program per (key block, kv head, sequence) that loops over the q heads of its GQA
group and their query blocks to own dK/dV; one program per (query block, q head,
sequence) for dQ.

Block skipping. Row i sits at position r = i + Sk - Sq and sees keys j with
r - left <= j <= r + right (causal: right = 0; -1: unbounded). A query block visits only
the key blocks [lo, hi) that hold a key some row of it sees (`_key_range`), a key block
only the query blocks [lo, hi) with a row that sees one of its keys (`_query_range`), so a
windowed layer costs S·W, not S². Inside, the blocks that every row sees entirely run
without per-element masks; only the edge blocks (window edges, causal diagonal, sequence
ends) are masked.

Layout: kernels take batch, head and sequence strides, so `.transpose(1, 2)` views are
read in place; the head dim must be unit-stride (vectorized loads), and a tensor with
another last stride is copied (strides as `ops.attention.bhm_strides` / `lse_strides` give
them). Varlen tensors are [T, H, D] with a zero batch stride: each program finds its
sequence's first query row in cu_seqlens and first key row in cu_seqlens_k. Head dims up
to 256 are padded to BLOCK_D (a power of two, >= 16) with masks.

Interpreter (TRITON_INTERPRET=1): under the `INTERPRET` constexpr (set by the launcher)
`_common`'s dots and casts give the GPU's results (see there). The score and forward-loop
helpers live in `_common` too, shared with the decode kernel (`flash_decode`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qlora_kernels.ops.attention import bhm_strides, lse_shape, lse_strides
from qlora_kernels.triton._common import (
    LN2,
    LOG2E,
    _cast,
    _dot,
    _fwd_inner,
    _interpreting,
    _load_rows,
    _load_rows_t,
    _scores,
    _sequence,
    _unit_last,
)

__all__ = ["flash_attention_fwd_triton", "flash_attention_bwd_triton"]


class _Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


# fp16/bf16, keyed by kernel and BLOCK_D. Not timed on hardware: each entry compiles for
# sm_80 and sm_90 (Triton 3.6 and 3.9) without register spills and inside sm_86's 101,376
# bytes of shared memory, with and without ALiBi / key padding / GQA / window / softcap /
# sinks (scripts/triton_static_report.py, checked by tests/test_triton_compile.py). sm_80's
# tensor-core dots need more registers than sm_90's, which is what bounds most entries.
# dK/dV keeps K, V and two fp32 accumulators of BLOCK_N x BLOCK_D per program, so it takes
# narrow query steps; a wider key block still cuts the Q / dO traffic per key (64 keys at
# head dim 128 spilled on sm_90 under Triton 3.6). dQ is the mirror image: a wide query
# block and narrow key steps.
_CONFIGS = {
    "fwd": {64: _Config(128, 64, 8, 3), 128: _Config(128, 32, 8, 3), 256: _Config(64, 32, 8, 2)},
    "dkdv": {64: _Config(32, 32, 8, 3), 128: _Config(16, 32, 8, 3), 256: _Config(32, 32, 8, 1)},
    "dq": {64: _Config(128, 32, 8, 3), 128: _Config(64, 32, 8, 3), 256: _Config(64, 16, 8, 2)},
}
# fp32 runs IEEE dots on FMA units, whose operands live in registers: small tiles, smaller
# as the head dim grows (a correctness path, not a fast one); checked as above.
_FP32_CONFIGS = {
    "fwd": {64: _Config(32, 32, 8, 2), 128: _Config(32, 16, 8, 2), 256: _Config(32, 16, 8, 2)},
    "dkdv": {64: _Config(16, 32, 8, 2), 128: _Config(16, 16, 8, 2), 256: _Config(16, 16, 8, 1)},
    "dq": {64: _Config(32, 16, 4, 2), 128: _Config(16, 16, 4, 2), 256: _Config(16, 16, 8, 2)},
}
# Softcap keeps tanh's tile live until dS in the dK/dV loop; where the entries above then
# spill (static check), narrower ones, keyed by fp32 and BLOCK_D.
_SOFTCAP_DKDV_CONFIGS = {
    False: {64: _Config(16, 32, 8, 3)},
    True: {64: _Config(16, 16, 8, 1), 128: _Config(16, 16, 8, 1)},
}
# The interpreter runs tiles as numpy arrays: small tiles keep tests fast, and the
# uneven BLOCK_M / BLOCK_N mirror the GPU tables so the stage boundaries get exercised.
_INTERPRETER_CONFIGS = {"fwd": _Config(32, 16, 1, 1), "dkdv": _Config(16, 32, 1, 1), "dq": _Config(32, 16, 1, 1)}


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
def _clamp_stages(lo, unmasked_lo, unmasked_hi, hi):
    """Stage bounds with lo <= unmasked_lo <= unmasked_hi <= hi (a block range seen by no
    row collapses to empty stages)."""
    unmasked_lo = tl.minimum(tl.maximum(unmasked_lo, lo), hi)
    unmasked_hi = tl.minimum(tl.maximum(unmasked_hi, unmasked_lo), hi)
    return lo, unmasked_lo, unmasked_hi, hi


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, LEFT: tl.constexpr, RIGHT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [start_m, start_m + BLOCK_M): keys [lo, hi) hold every key one of
    them sees, and the whole BLOCK_N blocks of [unmasked_lo, unmasked_hi) are seen by all
    of them (no mask there). lo, unmasked_lo and unmasked_hi lie on the BLOCK_N grid."""
    first = start_m + seqlen_k - seqlen_q  # positions of the block's first and last valid row
    last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + seqlen_k - seqlen_q
    lo = 0
    unmasked_lo = 0
    hi = seqlen_k
    unmasked_hi = seqlen_k
    if LEFT:
        lo = tl.maximum(first - window_left, 0) // BLOCK_N * BLOCK_N
        unmasked_lo = tl.cdiv(tl.maximum(last - window_left, 0), BLOCK_N) * BLOCK_N
    if RIGHT:
        hi = tl.minimum(hi, tl.maximum(last + window_right + 1, 0))
        unmasked_hi = tl.minimum(unmasked_hi, tl.maximum(first + window_right + 1, 0))
    return _clamp_stages(lo, unmasked_lo, unmasked_hi // BLOCK_N * BLOCK_N, hi)


@triton.jit
def _query_range(start_n, seqlen_q, seqlen_k, window_left, window_right, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For keys [start_n, start_n + BLOCK_N): query rows [lo, hi) hold every row that sees
    one of them, and the BLOCK_M blocks of [unmasked_lo, unmasked_hi) see all of them (rows
    past the end read lse +inf, so P = 0 there: they need no mask either). lo and
    unmasked_lo lie on the BLOCK_M grid, unmasked_hi too unless it is seqlen_q."""
    diag = seqlen_k - seqlen_q
    last_n = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1  # the block's last valid key
    lo = 0
    unmasked_lo = 0
    hi = seqlen_q
    unmasked_hi = seqlen_q
    if RIGHT:
        lo = tl.maximum(start_n - window_right - diag, 0) // BLOCK_M * BLOCK_M
        unmasked_lo = tl.cdiv(tl.maximum(last_n - window_right - diag, 0), BLOCK_M) * BLOCK_M
    if LEFT:
        hi = tl.minimum(hi, tl.maximum(last_n + window_left - diag + 1, 0))
        seen_to = start_n + window_left - diag + 1  # rows before it see the block's first key
        unmasked_hi = tl.where(seen_to >= seqlen_q, seqlen_q, tl.maximum(seen_to, 0) // BLOCK_M * BLOCK_M)
    return _clamp_stages(lo, unmasked_lo, unmasked_hi, hi)


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Slopes, KeyMask, Sinks, cu_seqlens, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm, stride_mb, stride_mn,
    seqlen_q, seqlen_k, group, qk_scale, softcap2, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SINKS: tl.constexpr, IS_VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    # int64 bases: batch * stride and the varlen row offset can pass 2**31
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    start_q, start_k, seqlen_q, seqlen_k = _sequence(cu_seqlens, cu_seqlens_k, seq, seqlen_q, seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    kv_head = head // group
    q_base = Q + seq * stride_qb + head * stride_qh + start_q * stride_qm
    k_base = K + seq * stride_kb + kv_head * stride_kh + start_k * stride_kn
    v_base = V + seq * stride_vb + kv_head * stride_vh + start_k * stride_vn
    mask_base = KeyMask + seq * stride_mb
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + head) * LOG2E

    rows = start_m + tl.arange(0, BLOCK_M)
    pos_q = rows + (seqlen_k - seqlen_q)
    q = _load_rows(q_base, rows, stride_qm, seqlen_q, HEAD_DIM, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_SINKS:
        # the sink is the first "key": its logit, weight 1, no value
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(Sinks + head) * LOG2E
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, unmasked_lo, unmasked_hi, hi = _key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, LEFT,
                                                  RIGHT, BLOCK_M, BLOCK_N)
    if LEFT:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                                   lo, unmasked_lo, pos_q, seqlen_k, qk_scale, softcap2, slope2, window_left,
                                   window_right, True, LEFT, RIGHT, SOFTCAP, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D,
                                   BLOCK_N, INPUT_PRECISION, INTERPRET)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                               unmasked_lo, unmasked_hi, pos_q, seqlen_k, qk_scale, softcap2, slope2, window_left,
                               window_right, False, LEFT, RIGHT, SOFTCAP, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D,
                               BLOCK_N, INPUT_PRECISION, INTERPRET)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                               unmasked_hi, hi, pos_q, seqlen_k, qk_scale, softcap2, slope2, window_left,
                               window_right, True, LEFT, RIGHT, SOFTCAP, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D,
                               BLOCK_N, INPUT_PRECISION, INTERPRET)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o_base = Out + seq * stride_ob + head * stride_oh + start_q * stride_om
    _store_rows(o_base, acc / l_safe[:, None], rows, stride_om, seqlen_q, HEAD_DIM, BLOCK_D, INTERPRET)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    l_base = Lse + seq * stride_lb + head * stride_lh + start_q * stride_lm
    tl.store(l_base + rows * stride_lm, lse, mask=rows < seqlen_q)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, DLse, Lse, Sinks, Delta, SinkTerm, cu_seqlens,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
    seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
    HAS_SINKS: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse; with sinks each row's exp(sink - lse) * delta too (dsinks
    is minus their sum per head)."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    start, _, seqlen_q, _ = _sequence(cu_seqlens, cu_seqlens, seq, seqlen_q, seqlen_q, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    valid = rows < seqlen_q
    o = _load_rows(Out + seq * stride_ob + head * stride_oh + start * stride_om, rows, stride_om, seqlen_q,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + seq * stride_dob + head * stride_doh + start * stride_dom, rows, stride_dom, seqlen_q,
                    HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_offset = seq * stride_lb + head * stride_lh + (start + rows) * stride_lm
    if HAS_DLSE:
        delta -= tl.load(DLse + row_offset, mask=valid, other=0.0)
    tl.store(Delta + row_offset, delta, mask=valid)
    if HAS_SINKS:
        lse = tl.load(Lse + row_offset, mask=valid, other=float("-inf"))
        # lse = -inf only with a sink of -inf and no key: that sink's probability is 0
        sink_p = tl.where(lse == float("-inf"), 0.0, tl.exp2((tl.load(Sinks + head) - lse) * LOG2E))
        tl.store(SinkTerm + row_offset, sink_p * delta, mask=valid)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, stride_lm,
                    mask_base, stride_mn, lo, hi, cols, seqlen_q, seqlen_k, qk_scale, softcap2, slope2, window_left,
                    window_right, MASK: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    INTERPRET: tl.constexpr):
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
        s_t, t_t = _scores(_dot(k, q_t, INPUT_PRECISION, INTERPRET), pos_q[None, :], cols[:, None], seqlen_k,
                           qk_scale, softcap2, slope2, window_left, window_right, mask_base, stride_mn,
                           MASK, LEFT, RIGHT, SOFTCAP, HAS_ALIBI, HAS_KPM)
        p_t = tl.exp2(s_t - lse2[None, :])
        dv += _dot(_cast(p_t, do.dtype, INTERPRET), do, INPUT_PRECISION, INTERPRET)
        dp_t = _dot(v, tl.trans(do), INPUT_PRECISION, INTERPRET)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += _dot(_cast(ds_t, q_t.dtype, INTERPRET), tl.trans(q_t), INPUT_PRECISION, INTERPRET)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, Slopes, KeyMask, cu_seqlens, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_lm, stride_mb, stride_mn,
    seqlen_q, seqlen_k, group, qk_scale, softcap2, softmax_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    start_q, start_k, seqlen_q, seqlen_k = _sequence(cu_seqlens, cu_seqlens_k, seq, seqlen_q, seqlen_k, IS_VARLEN)
    if start_n >= seqlen_k:
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K + seq * stride_kb + kv_head * stride_kh + start_k * stride_kn, cols, stride_kn, seqlen_k,
                   HEAD_DIM, BLOCK_D)
    v = _load_rows(V + seq * stride_vb + kv_head * stride_vh + start_k * stride_vn, cols, stride_vn, seqlen_k,
                   HEAD_DIM, BLOCK_D)
    mask_base = KeyMask + seq * stride_mb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, unmasked_lo, unmasked_hi, hi = _query_range(start_n, seqlen_q, seqlen_k, window_left, window_right, LEFT,
                                                    RIGHT, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        head = kv_head * group + g
        q_base = Q + seq * stride_qb + head * stride_qh + start_q * stride_qm
        do_base = DO + seq * stride_dob + head * stride_doh + start_q * stride_dom
        lse_base = Lse + seq * stride_lb + head * stride_lh + start_q * stride_lm
        delta_base = Delta + seq * stride_lb + head * stride_lh + start_q * stride_lm
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Slopes + head) * LOG2E
        if RIGHT:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                     stride_lm, mask_base, stride_mn, lo, unmasked_lo, cols, seqlen_q, seqlen_k,
                                     qk_scale, softcap2, slope2, window_left, window_right, True, LEFT, RIGHT,
                                     SOFTCAP, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_M, INPUT_PRECISION,
                                     INTERPRET)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                 stride_lm, mask_base, stride_mn, unmasked_lo, unmasked_hi, cols, seqlen_q, seqlen_k,
                                 qk_scale, softcap2, slope2, window_left, window_right, False, LEFT, RIGHT,
                                 SOFTCAP, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_M, INPUT_PRECISION,
                                 INTERPRET)
        if LEFT:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                     stride_lm, mask_base, stride_mn, unmasked_hi, hi, cols, seqlen_q, seqlen_k,
                                     qk_scale, softcap2, slope2, window_left, window_right, True, LEFT, RIGHT,
                                     SOFTCAP, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_M, INPUT_PRECISION,
                                     INTERPRET)
    _store_rows(DK + seq * stride_dkb + kv_head * stride_dkh + start_k * stride_dkn, dk * softmax_scale, cols,
                stride_dkn, seqlen_k, HEAD_DIM, BLOCK_D, INTERPRET)
    _store_rows(DV + seq * stride_dvb + kv_head * stride_dvh + start_k * stride_dvn, dv, cols, stride_dvn,
                seqlen_k, HEAD_DIM, BLOCK_D, INTERPRET)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn, lo, hi,
                  pos_q, seqlen_k, qk_scale, softcap2, slope2, window_left, window_right,
                  MASK: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_t = _load_rows_t(k_base, cols, stride_kn, seqlen_k, HEAD_DIM, BLOCK_D)
        v_t = _load_rows_t(v_base, cols, stride_vn, seqlen_k, HEAD_DIM, BLOCK_D)
        s, t = _scores(_dot(q, k_t, INPUT_PRECISION, INTERPRET), pos_q[:, None], cols[None, :], seqlen_k,
                       qk_scale, softcap2, slope2, window_left, window_right, mask_base, stride_mn,
                       MASK, LEFT, RIGHT, SOFTCAP, HAS_ALIBI, HAS_KPM)
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, v_t, INPUT_PRECISION, INTERPRET)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(_cast(ds, k_t.dtype, INTERPRET), tl.trans(k_t), INPUT_PRECISION, INTERPRET)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta, Slopes, KeyMask, cu_seqlens, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_lm, stride_mb, stride_mn,
    seqlen_q, seqlen_k, group, qk_scale, softcap2, softmax_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    start_q, start_k, seqlen_q, seqlen_k = _sequence(cu_seqlens, cu_seqlens_k, seq, seqlen_q, seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    kv_head = head // group
    k_base = K + seq * stride_kb + kv_head * stride_kh + start_k * stride_kn
    v_base = V + seq * stride_vb + kv_head * stride_vh + start_k * stride_vn
    mask_base = KeyMask + seq * stride_mb
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + head) * LOG2E

    rows = start_m + tl.arange(0, BLOCK_M)
    pos_q = rows + (seqlen_k - seqlen_q)
    q = _load_rows(Q + seq * stride_qb + head * stride_qh + start_q * stride_qm, rows, stride_qm, seqlen_q,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + seq * stride_dob + head * stride_doh + start_q * stride_dom, rows, stride_dom, seqlen_q,
                    HEAD_DIM, BLOCK_D)
    lse_base = Lse + seq * stride_lb + head * stride_lh + start_q * stride_lm
    lse2 = _load_lse2(lse_base, rows, stride_lm, seqlen_q)
    delta_base = Delta + seq * stride_lb + head * stride_lh + start_q * stride_lm
    delta = tl.load(delta_base + rows * stride_lm, mask=rows < seqlen_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, unmasked_lo, unmasked_hi, hi = _key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, LEFT,
                                                  RIGHT, BLOCK_M, BLOCK_N)
    # The masked stages must also mask keys past the end: with p = exp2(s - lse2) unbounded
    # there, inf * (zero key) would put NaN into dQ.
    if LEFT:
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                           lo, unmasked_lo, pos_q, seqlen_k, qk_scale, softcap2, slope2, window_left, window_right,
                           True, LEFT, RIGHT, SOFTCAP, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N,
                           INPUT_PRECISION, INTERPRET)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                       unmasked_lo, unmasked_hi, pos_q, seqlen_k, qk_scale, softcap2, slope2, window_left,
                       window_right, False, LEFT, RIGHT, SOFTCAP, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N,
                       INPUT_PRECISION, INTERPRET)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn,
                       unmasked_hi, hi, pos_q, seqlen_k, qk_scale, softcap2, slope2, window_left, window_right,
                       True, LEFT, RIGHT, SOFTCAP, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N,
                       INPUT_PRECISION, INTERPRET)
    _store_rows(DQ + seq * stride_dqb + head * stride_dqh + start_q * stride_dqm, dq * softmax_scale, rows,
                stride_dqm, seqlen_q, HEAD_DIM, BLOCK_D, INTERPRET)


def _config(kind: str, block_d: int, dtype: torch.dtype, softcap: bool = False) -> _Config:
    if _interpreting():
        return _INTERPRETER_CONFIGS[kind]
    fp32 = dtype == torch.float32
    block_d = max(64, block_d)
    if softcap and kind == "dkdv" and block_d in _SOFTCAP_DKDV_CONFIGS[fp32]:
        return _SOFTCAP_DKDV_CONFIGS[fp32][block_d]
    return (_FP32_CONFIGS if fp32 else _CONFIGS)[kind][block_d]


def _longest(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


class _Problem(NamedTuple):
    """Sizes and the tensors and scalars every kernel reads besides q / k / v."""

    varlen: bool
    num_seqs: int
    heads_q: int
    group: int
    seqlen_q: int  # the longest one for varlen
    seqlen_k: int
    scale: float
    qk_scale: float  # what the kernels multiply q.k by: base 2, or over softcap
    softcap2: float
    window: tuple[int, int]  # (left, right) keys around a row's position; causal is right 0
    slopes: torch.Tensor
    key_mask: torch.Tensor
    mask_strides: tuple[int, int]
    sinks: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_k: torch.Tensor
    flags: dict


def _side_inputs(q, alibi_slopes, key_padding_mask):
    """(slopes, key_mask, mask_strides) as the kernels read them; q stands in for an unused pointer."""
    slopes = q if alibi_slopes is None else alibi_slopes.to(torch.float32).contiguous()
    if key_padding_mask is None:
        return slopes, q, (0, 0)
    # bool and uint8 share a byte, so the mask is read in place
    key_mask = key_padding_mask.view(torch.uint8)
    return slopes, key_mask, (key_mask.stride(0), key_mask.stride(1))


def _problem(q, k, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
             max_seqlen_k, window_left, window_right, softcap, sinks) -> _Problem:
    varlen = cu_seqlens is not None
    heads_q, head_dim = q.shape[1], q.shape[-1]
    if varlen:
        cu_seqlens = cu_seqlens.contiguous()
        num_seqs = cu_seqlens.numel() - 1
        seqlen_q = _longest(cu_seqlens) if max_seqlen is None else int(max_seqlen)
        if cu_seqlens_k is None:
            cu_seqlens_k, seqlen_k = cu_seqlens, seqlen_q
        else:
            cu_seqlens_k = cu_seqlens_k.contiguous()
            seqlen_k = _longest(cu_seqlens_k) if max_seqlen_k is None else int(max_seqlen_k)
    else:
        num_seqs, seqlen_q, seqlen_k = q.shape[0], q.shape[2], k.shape[2]
        cu_seqlens = cu_seqlens_k = q  # unused pointers
    slopes, key_mask, mask_strides = _side_inputs(q, alibi_slopes, key_padding_mask)
    # causal bounds keys by j <= r, which a right window (>= 0) can only repeat
    left, right = window_left, 0 if causal else window_right
    block_d = max(16, triton.next_power_of_2(head_dim))
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, LEFT=left >= 0, RIGHT=right >= 0, SOFTCAP=softcap > 0,
                 HAS_ALIBI=alibi_slopes is not None, HAS_KPM=key_padding_mask is not None, IS_VARLEN=varlen,
                 INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=_interpreting())
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    qk_scale = scale / softcap if softcap > 0 else scale * math.log2(math.e)
    return _Problem(varlen, num_seqs, heads_q, heads_q // k.shape[1], seqlen_q, seqlen_k, scale, qk_scale,
                    float(softcap) * math.log2(math.e), (max(left, 0), max(right, 0)), slopes, key_mask,
                    mask_strides, q if sinks is None else sinks.to(torch.float32).contiguous(), cu_seqlens,
                    cu_seqlens_k, flags)


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
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.attention.flash_attention` (and `_varlen` with cu_seqlens),
    for arguments `ops.attention.check_args` accepted.

    Dense: q [B, Hq, Sq, D], k / v [B, Hkv, Sk, D], any batch / head / sequence strides.
    Varlen: q [Tq, Hq, D], k / v [Tk, Hkv, D], cu_seqlens [N + 1] and cu_seqlens_k (None:
    keys packed like queries); max_seqlen / max_seqlen_k, the longest sequences, are
    computed from the offsets when None. Returns out (contiguous, q's shape and dtype) and
    fp32 natural-log lse ([B, Hq, Sq] or [Hq, Tq]).
    """
    pb = _problem(q, k, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
                  max_seqlen_k, window_left, window_right, softcap, sinks)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape(q, pb.varlen), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    cfg = _config("fwd", pb.flags["BLOCK_D"], q.dtype)
    grid = (triton.cdiv(pb.seqlen_q, cfg.BLOCK_M), pb.heads_q, pb.num_seqs)
    _fwd_kernel[grid](
        q, k, v, out, lse, pb.slopes, pb.key_mask, pb.sinks, pb.cu_seqlens, pb.cu_seqlens_k,
        *bhm_strides(q, pb.varlen), *bhm_strides(k, pb.varlen), *bhm_strides(v, pb.varlen),
        *bhm_strides(out, pb.varlen), *lse_strides(lse, pb.varlen), *pb.mask_strides,
        pb.seqlen_q, pb.seqlen_k, pb.group, pb.qk_scale, pb.softcap2, *pb.window,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HAS_SINKS=sinks is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pb.flags,
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
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dsinks) for `flash_attention_fwd_triton` with the same arguments, given
    its `out` and `lse`, and dlse (lse's gradient, None for none). Gradients have their
    input's shape, dtype and (when dense) strides; dsinks is fp32 [Hq], None without sinks."""
    pb = _problem(q, k, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
                  max_seqlen_k, window_left, window_right, softcap, sinks)
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    # empty_like keeps a dense input's strides (say a transposed view), so the gradient
    # needs no copy on its way back through that view
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dsinks = None if sinks is None else torch.zeros(pb.heads_q, dtype=torch.float32, device=q.device)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_(), dsinks
    lse = lse.to(torch.float32).contiguous()
    # same strides as lse, so the kernels share one set
    delta = torch.empty_like(lse)
    sink_term = torch.empty_like(lse) if sinks is not None else lse
    dlse = lse if dlse is None else dlse.to(torch.float32).contiguous()
    lse_layout = lse_strides(lse, pb.varlen)
    qkv_strides = (*bhm_strides(q, pb.varlen), *bhm_strides(k, pb.varlen), *bhm_strides(v, pb.varlen))
    do_strides = bhm_strides(dout, pb.varlen)
    flags = pb.flags
    scalars = (pb.seqlen_q, pb.seqlen_k, pb.group, pb.qk_scale, pb.softcap2, pb.scale, *pb.window)

    pre = _config("dq", flags["BLOCK_D"], q.dtype)
    _bwd_preprocess_kernel[(triton.cdiv(pb.seqlen_q, pre.BLOCK_M), pb.heads_q, pb.num_seqs)](
        out, dout, dlse, lse, pb.sinks, delta, sink_term, pb.cu_seqlens, *bhm_strides(out, pb.varlen), *do_strides,
        *lse_layout, pb.seqlen_q,
        HEAD_DIM=flags["HEAD_DIM"], BLOCK_D=flags["BLOCK_D"], BLOCK_M=pre.BLOCK_M, HAS_DLSE=dlse is not lse,
        HAS_SINKS=sinks is not None, IS_VARLEN=pb.varlen, num_warps=4,
    )
    if dsinks is not None:
        # per-row terms summed by torch: deterministic, no atomics
        dsinks = -sink_term.sum(dim=1 if pb.varlen else (0, 2))
    if dk.numel():
        cfg = _config("dkdv", flags["BLOCK_D"], q.dtype, flags["SOFTCAP"])
        _bwd_dkdv_kernel[(triton.cdiv(pb.seqlen_k, cfg.BLOCK_N), pb.heads_q // pb.group, pb.num_seqs)](
            q, k, v, dout, dk, dv, lse, delta, pb.slopes, pb.key_mask, pb.cu_seqlens, pb.cu_seqlens_k,
            *qkv_strides, *do_strides, *bhm_strides(dk, pb.varlen), *bhm_strides(dv, pb.varlen),
            *lse_layout, *pb.mask_strides, *scalars,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
        )
    cfg = _config("dq", flags["BLOCK_D"], q.dtype)
    _bwd_dq_kernel[(triton.cdiv(pb.seqlen_q, cfg.BLOCK_M), pb.heads_q, pb.num_seqs)](
        q, k, v, dout, dq, lse, delta, pb.slopes, pb.key_mask, pb.cu_seqlens, pb.cu_seqlens_k,
        *qkv_strides, *do_strides, *bhm_strides(dq, pb.varlen), *lse_layout, *pb.mask_strides, *scalars,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    return dq, dk, dv, dsinks
