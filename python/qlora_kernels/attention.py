"""`qlora_kernels.flash_attention`: causal attention with O(N) memory, fwd and bwd."""

from __future__ import annotations

import math

import torch

from .ops import attention as ops

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, v, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; flash_attention takes float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    rank = 3 if cu_seqlens is not None else 4
    layout = "[total_tokens, heads, head_dim] with cu_seqlens" if rank == 3 else "[batch, heads, seq, head_dim]"
    if not (q.dim() == k.dim() == v.dim() == rank):
        raise ValueError(f"q, k, v must be {layout}; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    head_axis = 1
    hq, hkv = q.shape[head_axis], k.shape[head_axis]
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[-1] > 256 or q.shape[-1] < 1:
        raise ValueError(f"head_dim must match between q and k and be in 1..256, got {q.shape[-1]} and {k.shape[-1]}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    if rank == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    if rank == 3 and q.shape[0] != k.shape[0]:
        raise ValueError("packed (cu_seqlens) attention is self-attention: q and k need the same total_tokens")
    if alibi_slopes is not None and (alibi_slopes.shape != (hq,) or alibi_slopes.device != q.device):
        raise ValueError(f"alibi_slopes must be [{hq}] on {q.device}, got {tuple(alibi_slopes.shape)} "
                         f"on {alibi_slopes.device}")
    if key_padding_mask is not None:
        if rank == 3:
            raise ValueError("key_padding_mask and cu_seqlens are exclusive: packed sequences carry no padding")
        if key_padding_mask.shape != (k.shape[0], k.shape[2]) or key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be [batch, seq_k] = [{k.shape[0]}, {k.shape[2]}] on {q.device}, "
                             f"got {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
    if cu_seqlens is not None:
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor on {q.device}")
        if max_seqlen is None:
            raise ValueError("max_seqlen is required with cu_seqlens")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Attention of q over k, v with online softmax: memory O(N), never S x S.

    Layout `[batch, heads, seq, head_dim]` like `F.scaled_dot_product_attention` (any
    strides), or `[total_tokens, heads, head_dim]` with `cu_seqlens` (int32 offsets of packed
    sequences) and `max_seqlen`. GQA / MQA when q has a multiple of k's heads. With
    `seq_q < seq_k` the causal mask is aligned bottom-right (KV-cache decode). `alibi_slopes`
    [heads] adds slope * (j - i) in-kernel (Bloom). `key_padding_mask` [batch, seq_k], True =
    attend; a query with no key left returns 0. Differentiable in q, k, v.
    """
    _check(q, k, v, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.float().contiguous()
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool().contiguous()
    out, _ = ops.flash_attention_fwd(
        q, k, v, causal, scale, alibi_slopes, key_padding_mask, cu_seqlens, int(max_seqlen or 0)
    )
    return out
