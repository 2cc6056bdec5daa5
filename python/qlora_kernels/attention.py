"""`qlora_kernels.flash_attention`: attention with O(N) memory, forward and backward."""

from __future__ import annotations

import math
import warnings

import torch

from .ops import attention as ops
from .reference.attention import keep_mask

# fallbacks already warned about, one warning per reason
_WARNED: set[str] = set()


def _fallback(reason: str, strict: bool) -> None:
    if strict:
        raise NotImplementedError(f"qlora_kernels.flash_attention: {reason} is not in the kernels (strict=True)")
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"qlora_kernels.flash_attention: {reason} is not in the kernels; computing this call with "
                      "PyTorch's scaled_dot_product_attention", stacklevel=3)


def _sdpa(q, k, v, causal, scale, alibi_slopes, key_padding_mask, window_size, dropout_p):
    """The dense layout through F.scaled_dot_product_attention, with this package's conventions
    (bottom-right causal and window, symmetric ALiBi, rows with no key give 0)."""
    Sq, Sk = q.shape[2], k.shape[2]
    keep = keep_mask(Sq, Sk, causal, window_size, q.device).view(1, 1, Sq, Sk)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.view(k.shape[0], 1, 1, Sk)
    bias = torch.zeros((), dtype=q.dtype, device=q.device)
    if alibi_slopes is not None:
        row = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
        distance = (torch.arange(Sk, device=q.device)[None, :] - row).abs()
        bias = (-alibi_slopes.float().view(1, -1, 1, 1) * distance).to(q.dtype)
    mask = torch.where(keep, bias, torch.tensor(-math.inf, dtype=q.dtype, device=q.device))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return torch.where(keep.any(-1, keepdim=True), out, 0)


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
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    deterministic: bool = False,
    strict: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k, v with online softmax: memory O(N), never S x S.

    Layout `[batch, heads, seq, head_dim]` like `F.scaled_dot_product_attention` (any
    strides), or `[total_tokens, heads, head_dim]` with `cu_seqlens` (int32 offsets of packed
    sequences) and `max_seqlen`; keys packed apart from queries take `cu_seqlens_k` and
    `max_seqlen_k` (flash-attn's varlen interface). GQA / MQA when q has a multiple of k's heads.
    With `seq_q < seq_k` the causal mask and the window are aligned bottom-right (KV-cache
    decode).

    window_size (left, right): query at position r sees keys r - left .. r + right (-1 =
    unbounded), flash-attn's local attention; keys outside are never computed.
    softcap: scores become softcap * tanh(score / softcap) (Gemma 2); 0 = off.
    alibi_slopes [heads]: adds -slope * |distance| in-kernel (Bloom when causal).
    sinks [heads]: one learned logit per head in the softmax denominator (transformers'
    s_aux), differentiable.
    key_padding_mask [batch, seq_k] bool, True = attend; a query with no key left returns 0.
    return_lse: also return the fp32 softmax log-sum-exp ([B, Hq, Sq], varlen [Hq, Tq]),
    differentiable too.
    deterministic: accepted for flash-attn's callers; the kernels always are.
    dropout_p > 0 is not in the kernels: that call runs through PyTorch's SDPA with one warning
    (strict=True raises NotImplementedError instead); packed sequences, softcap and sinks
    have no such fallback and raise.
    """
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = window_size
    if dropout_p:
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
        if cu_seqlens is not None or softcap or sinks is not None or return_lse:
            raise NotImplementedError("qlora_kernels.flash_attention: attention dropout is not in the kernels, and "
                                      "PyTorch's SDPA cannot take packed sequences, softcap, sinks or return_lse")
        ops.check_args(q, k, v, causal, scale, alibi_slopes, key_padding_mask, None, 0, None, 0, left, right, 0.0,
                       None)
        _fallback("attention dropout (dropout_p > 0)", strict)
        return _sdpa(q, k, v, causal, scale, alibi_slopes, key_padding_mask, (left, right), dropout_p)
    if cu_seqlens is not None and max_seqlen is None:
        raise ValueError("max_seqlen is required with cu_seqlens")
    if cu_seqlens_k is not None and max_seqlen_k is None:
        raise ValueError("max_seqlen_k is required with cu_seqlens_k")
    if alibi_slopes is not None and alibi_slopes.dtype.is_floating_point:
        alibi_slopes = alibi_slopes.float().contiguous()
    out, lse = ops.flash_attention_fwd(
        q, k, v, causal, scale, alibi_slopes, key_padding_mask, cu_seqlens, 0 if max_seqlen is None else max_seqlen,
        cu_seqlens_k, 0 if max_seqlen_k is None else max_seqlen_k, left, right, float(softcap), sinks,
    )
    return (out, lse) if return_lse else out
