"""Flash-decoding: a few query rows (decode, Sq = 1..16) against a long KV cache.

With Sq that small, one program per query block (the prefill kernel's grid) leaves most of
the GPU idle while each program streams the whole cache. Here the keys are cut into
`num_splits` contiguous ranges, one program per (split, row block, batch x kv head)
computes a partial (out, lse) over its range, and a combine kernel merges the partials
with weights exp(lse_split - max lse).

Rows of a program are (q head of the GQA group, query) pairs: every q head of a group
reads the same K/V tiles, so loading them once per group cuts cache traffic by the group
size and gives `tl.dot` a useful M even when Sq = 1.

Semantics are `reference.attention.flash_attention` with causal=True (bottom-right: query
i sits at position r = i + Sk - Sq and sees keys j <= r), GQA, ALiBi, key_padding_mask, a
sliding window (keys j >= r - window_left), logit softcap and attention sinks; rows with no
key give out 0 and lse -inf (the sink with sinks). Also varlen, `flash_attention_varlen`:
a few queries per sequence against packed caches (cu_seqlens_k), each program reading its
sequence's offsets. Forward only.

* Window: the splits cover only keys [Sk - Sq - window_left, Sk) of each sequence, the keys
  some query row can see; keys before are never read, so a windowed layer streams W + Sq
  keys, not the cache. window_right cannot cut anything under the causal mask (it bounds
  j <= r + right with right >= 0).
* ALiBi: the reference's symmetric -slope * |j - r|, as in the prefill kernel.
* Sinks enter once, in the combine: the sink's exp(sink) joins the sum of the splits'
  exp(lse), so lse includes it and a row with no key gets out 0 and lse = sink.

Numerics (base-2 online softmax, fp32 accumulation, interpreter handling) are those of
`flash_attention`: a split runs the same scores and online-softmax loop (`_common`), with
every block masked. Partials are kept in fp32 and rounded once, in the combine.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qlora_kernels.ops.attention import bhm_strides, lse_shape
from qlora_kernels.triton._common import LN2, LOG2E, _cast, _fwd_inner, _interpreting, _sequence, _unit_last

__all__ = ["flash_decode_triton"]

# A row's partials are merged in one [splits, BLOCK_D] tile, which this keeps in registers.
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    Q, K, V, OutPart, LsePart, Slopes, KeyMask, cu_seqlens, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mn,
    seqlen_q, seqlen_k, heads_kv, group, split_size, num_splits, window_left, qk_scale, softcap2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    seq = (tl.program_id(2) // heads_kv).to(tl.int64)
    kv_head = (tl.program_id(2) % heads_kv).to(tl.int64)
    # varlen: packed [T, H, D] with zero batch strides; seqlen_q / seqlen_k arrive as the longest ones
    q_start, k_start, seqlen_q, seqlen_k = _sequence(cu_seqlens, cu_seqlens_k, seq, seqlen_q, seqlen_k, IS_VARLEN)
    if tl.program_id(1) * BLOCK_M >= group * seqlen_q:
        return
    # row r is query r % Sq of q head kv_head * group + r // Sq
    row_ok = rows < group * seqlen_q
    head = kv_head * group + rows // seqlen_q
    qi = rows % seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + seq * stride_qb + q_start * stride_qm
    q_ptrs = q_base + head[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    pos_q = qi + (seqlen_k - seqlen_q)
    slope2 = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = (tl.load(Slopes + head, mask=row_ok, other=0.0) * LOG2E)[:, None]
    k_base = K + seq * stride_kb + kv_head * stride_kh + k_start * stride_kn
    v_base = V + seq * stride_vb + kv_head * stride_vh + k_start * stride_vn
    mask_base = KeyMask + seq * stride_mb

    # the splits cover keys [key_lo, Sk), those some query row sees: keys before are never read
    key_lo = tl.maximum(seqlen_k - seqlen_q - window_left, 0)
    lo = key_lo + split * split_size
    hi = tl.minimum(lo + split_size, seqlen_k)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # The prefill kernel's loop with the split's end `hi` as the sequence end, so keys of the
    # next split are never read; positions use the real seqlen_k. Every block is masked
    # (decode is bandwidth-bound): keys j with r - window_left <= j <= r (causal, right 0),
    # where the launcher passes window_left = Sk without a window.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mn, lo, hi,
                               pos_q, hi, qk_scale, softcap2, slope2, window_left, 0, True, True, True, HAS_SOFTCAP,
                               HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N, INPUT_PRECISION, INTERPRET)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    # partials are contiguous [rows of out, num_splits(, D)]: out is [B, Hq, Sq, D] or varlen [T, Hq, D]
    if IS_VARLEN:
        out_row = (q_start + qi) * (heads_kv * group) + head
    else:
        out_row = (seq * (heads_kv * group) + head) * seqlen_q + qi
    part = out_row * num_splits + split
    tl.store(OutPart + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(LsePart + part, tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2), mask=row_ok)


@triton.jit
def _decode_combine_kernel(OutPart, LsePart, Out, Lse, Sinks, num_splits, heads_q, seqlen_q,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                           HAS_SINKS: tl.constexpr, IS_VARLEN: tl.constexpr, INTERPRET: tl.constexpr):
    # a row of the contiguous out: flat (batch, q head, query), varlen (token, q head) with
    # seqlen_q the token count and lse [Hq, T]
    row = tl.program_id(0).to(tl.int64)
    if IS_VARLEN:
        head = row % heads_q
        lse_at = head * seqlen_q + row // heads_q
    else:
        head = (row // seqlen_q) % heads_q
        lse_at = row
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LsePart + row * num_splits + splits, mask=splits < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    if HAS_SINKS:
        sink = tl.load(Sinks + head)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2((lse_s - m_safe) * LOG2E)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp2((sink - m_safe) * LOG2E)
    o_s = tl.load(OutPart + (row * num_splits + splits[:, None]) * HEAD_DIM + offs_d[None, :],
                  mask=(splits < num_splits)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    empty = total == 0.0
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(empty, 1.0, total)
    tl.store(Out + row * HEAD_DIM + offs_d, _cast(o, Out.dtype.element_ty, INTERPRET), mask=offs_d < HEAD_DIM)
    tl.store(Lse + lse_at, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))))


def _auto_splits(programs: int, key_blocks: int, device: torch.device) -> int:
    if device.type != "cuda" or _interpreting():
        return 1  # CPU: splitting only adds work
    # about two programs per SM; a split gets at least one key block
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(triton.cdiv(2 * sms, programs), key_blocks)


def flash_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int = 0,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int = 0,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [B, Hq, Sq, D] (Sq small) on a cache k / v [B, Hkv, Sk, D], or of
    packed q [Tq, Hq, D] (cu_seqlens, max_seqlen) on packed caches k / v [Tk, Hkv, D]
    (cu_seqlens_k, max_seqlen_k; None: packed like q).

    Same results as `reference.attention.flash_attention(q, k, v, True, ...)` (varlen:
    `flash_attention_varlen`) with window_size=(window_left, window_right) (-1 unbounded),
    softcap (0 none) and sinks [Hq]: out (contiguous, q's shape and dtype) and fp32 lse
    [B, Hq, Sq] (varlen [Hq, Tq]). The arguments are those `ops.attention.check_args`
    accepted. Any batch / head / sequence strides. `num_splits` (at most MAX_SPLITS; the
    default fills the GPU) caps how many key ranges are reduced in parallel.
    """
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    varlen = cu_seqlens is not None
    Hq, D, Hkv = q.shape[1], q.shape[-1], k.shape[1]
    if varlen:
        if cu_seqlens_k is None:
            cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
        B, Sq, Sk = cu_seqlens.numel() - 1, int(max_seqlen), int(max_seqlen_k)
    else:
        B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    device = q.device
    sink_lse = None if sinks is None else sinks.to(device=device, dtype=torch.float32).contiguous()
    if q.numel() == 0 or Sk == 0 or k.numel() == 0:  # no keys: every row is empty
        lse = (torch.full(lse_shape(q, varlen), -math.inf, dtype=torch.float32, device=device) if sink_lse is None
               else sink_lse.view(Hq, 1).expand(lse_shape(q, varlen)).contiguous())
        return torch.zeros(q.shape, dtype=q.dtype, device=device), lse
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    qkv_strides = (*bhm_strides(q, varlen), *bhm_strides(k, varlen), *bhm_strides(v, varlen))
    group = Hq // Hkv
    slopes = q if alibi_slopes is None else alibi_slopes.to(device=device, dtype=torch.float32).contiguous()
    # bool and uint8 share a byte, so the mask is read in place
    key_mask = q if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    mask_strides = (0, 0) if key_padding_mask is None else (key_mask.stride(0), key_mask.stride(1))

    interpret = _interpreting()
    fp32 = q.dtype == torch.float32
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # Tiles checked to compile for sm_90 without register spills (not timed). fp32 dots run
    # on FMA units with operands in registers, hence its smaller tiles; at D = 256 the K/V
    # step is halved so two pipeline stages stay well inside shared memory. The
    # interpreter's 16-key steps keep tests short.
    BLOCK_M = min(32 if fp32 else 64, max(16, triton.next_power_of_2(group * Sq)))
    BLOCK_N = 16 if interpret or fp32 else (32 if BLOCK_D > 128 else 64)
    row_blocks = triton.cdiv(group * Sq, BLOCK_M)
    # a window wider than the cache cuts nothing; past Sq + window_left keys, nothing is seen
    window = min(window_left, Sk) if window_left >= 0 else Sk
    key_span = min(Sk, Sq + window)
    key_blocks = triton.cdiv(key_span, BLOCK_N)
    if num_splits is None:
        num_splits = _auto_splits(B * Hkv * row_blocks, key_blocks, device)
    num_splits = min(num_splits, MAX_SPLITS, key_blocks)
    split_size = triton.cdiv(key_blocks, num_splits) * BLOCK_N
    num_splits = triton.cdiv(key_span, split_size)

    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    qk_scale = scale / softcap if softcap > 0 else scale * math.log2(math.e)
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    lse = torch.empty(lse_shape(q, varlen), dtype=torch.float32, device=device)
    out_part = torch.empty((q.numel() // D, num_splits, D), dtype=torch.float32, device=device)
    lse_part = torch.empty((q.numel() // D, num_splits), dtype=torch.float32, device=device)
    offsets = (cu_seqlens, cu_seqlens_k) if varlen else (q, q)
    _decode_split_kernel[(num_splits, row_blocks, B * Hkv)](
        q, k, v, out_part, lse_part, slopes, key_mask, *offsets, *qkv_strides, *mask_strides,
        Sq, Sk, Hkv, group, split_size, num_splits, window, qk_scale, float(softcap) * math.log2(math.e),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HAS_ALIBI=alibi_slopes is not None, HAS_KPM=key_padding_mask is not None, HAS_SOFTCAP=softcap > 0,
        IS_VARLEN=varlen, INPUT_PRECISION="ieee" if fp32 else "tf32", INTERPRET=interpret,
        num_warps=4, num_stages=2 if BLOCK_D > 128 else 3,
    )
    BLOCK_S = triton.next_power_of_2(num_splits)
    _decode_combine_kernel[(q.numel() // D,)](
        out_part, lse_part, out, lse, q if sink_lse is None else sink_lse, num_splits, Hq,
        q.shape[0] if varlen else Sq,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S, HAS_SINKS=sink_lse is not None, IS_VARLEN=varlen,
        INTERPRET=interpret, num_warps=min(8, max(1, BLOCK_S * BLOCK_D // 1024)),  # ~32 fp32 partials per thread
    )
    return out, lse
