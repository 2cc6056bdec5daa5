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
i sees keys j <= i + Sk - Sq), GQA, ALiBi and key_padding_mask; rows with no key give
out 0 and lse -inf. Forward only. Numerics (base-2 online softmax, fp32 accumulation,
interpreter handling) are those of `flash_attention`, whose helpers this reuses;
partials are kept in fp32 and rounded once, in the combine.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qlora_kernels.triton.flash_attention import (
    LN2,
    LOG2E,
    MAX_HEAD_DIM,
    _cast,
    _fwd_inner,
    _interpreting,
    _unit_last,
    side_inputs,
)

__all__ = ["flash_decode_triton"]

# A row's partials are merged in one [splits, BLOCK_D] tile, which this keeps in registers.
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    Q, K, V, OutPart, LsePart, Slopes, KeyMask,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mn,
    seqlen_q, seqlen_k, heads_kv, group, split_size, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    seq = (tl.program_id(2) // heads_kv).to(tl.int64)
    kv_head = (tl.program_id(2) % heads_kv).to(tl.int64)
    # row r is query r % Sq of q head kv_head * group + r // Sq
    row_ok = rows < group * seqlen_q
    head = kv_head * group + rows // seqlen_q
    qi = rows % seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + seq * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    pos_q = qi + (seqlen_k - seqlen_q)
    slope2 = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = (tl.load(Slopes + head, mask=row_ok, other=0.0) * LOG2E)[:, None]

    lo = split * split_size
    hi = tl.minimum(lo + split_size, seqlen_k)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # `hi` stands in for seqlen_k as the key bound, so keys of the next split are masked;
    # positions still use the real seqlen_k. Decode is bandwidth-bound, so every block
    # is simply masked.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + seq * stride_kb + kv_head * stride_kh,
                               V + seq * stride_vb + kv_head * stride_vh, stride_kn, stride_vn,
                               KeyMask + seq * stride_mb, stride_mn, lo, hi, pos_q, hi, qk_scale, slope2,
                               True, True, HAS_ALIBI, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N, INPUT_PRECISION,
                               INTERPRET)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    # partials are contiguous [B, Hq, Sq, num_splits(, D)]; this group's rows are consecutive
    part = ((seq * (heads_kv * group) + kv_head * group) * seqlen_q + rows) * num_splits + split
    tl.store(OutPart + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(LsePart + part, tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2), mask=row_ok)


@triton.jit
def _decode_combine_kernel(OutPart, LsePart, Out, Lse, num_splits,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                           INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # flat (batch, q head, query); outputs are contiguous
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LsePart + row * num_splits + splits, mask=splits < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2((lse_s - m_safe) * LOG2E)
    total = tl.sum(w, 0)
    o_s = tl.load(OutPart + (row * num_splits + splits[:, None]) * HEAD_DIM + offs_d[None, :],
                  mask=(splits < num_splits)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    empty = total == 0.0
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(empty, 1.0, total)
    tl.store(Out + row * HEAD_DIM + offs_d, _cast(o, Out.dtype.element_ty, INTERPRET), mask=offs_d < HEAD_DIM)
    tl.store(Lse + row, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))))


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
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [B, Hq, Sq, D] (Sq small) on a cache k / v [B, Hkv, Sk, D].

    Same results as `reference.attention.flash_attention(q, k, v, True, ...)`: out
    (contiguous [B, Hq, Sq, D], q's dtype) and fp32 lse [B, Hq, Sq]. Any batch / head /
    sequence strides. `num_splits` (at most MAX_SPLITS; the default fills the GPU) caps
    how many key ranges are reduced in parallel.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share fp16, bf16 or fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (head dim at most {MAX_HEAD_DIM})")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
    device = q.device
    if q.numel() == 0 or Sk == 0:  # no keys: every row is empty
        return (torch.zeros(q.shape, dtype=q.dtype, device=device),
                torch.full((B, Hq, Sq), -math.inf, dtype=torch.float32, device=device))
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    group = Hq // Hkv

    slopes, key_mask, mask_strides = side_inputs(q, alibi_slopes, key_padding_mask, Hq, B, Sk)

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
    key_blocks = triton.cdiv(Sk, BLOCK_N)
    if num_splits is None:
        num_splits = _auto_splits(B * Hkv * row_blocks, key_blocks, device)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be positive")
    num_splits = min(num_splits, MAX_SPLITS, key_blocks)
    split_size = triton.cdiv(key_blocks, num_splits) * BLOCK_N
    num_splits = triton.cdiv(Sk, split_size)

    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=device)
    out_part = torch.empty((B, Hq, Sq, num_splits, D), dtype=torch.float32, device=device)
    lse_part = torch.empty((B, Hq, Sq, num_splits), dtype=torch.float32, device=device)
    _decode_split_kernel[(num_splits, row_blocks, B * Hkv)](
        q, k, v, out_part, lse_part, slopes, key_mask,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mask_strides,
        Sq, Sk, Hkv, group, split_size, num_splits,
        (float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)) * math.log2(math.e),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HAS_ALIBI=alibi_slopes is not None, HAS_KPM=key_padding_mask is not None,
        INPUT_PRECISION="ieee" if fp32 else "tf32", INTERPRET=interpret,
        num_warps=4, num_stages=2 if BLOCK_D > 128 else 3,
    )
    BLOCK_S = triton.next_power_of_2(num_splits)
    _decode_combine_kernel[(B * Hq * Sq,)](
        out_part, lse_part, out, lse, num_splits,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S, INTERPRET=interpret,
        num_warps=min(8, max(1, BLOCK_S * BLOCK_D // 1024)),  # about 32 fp32 partial values per thread
    )
    return out, lse
