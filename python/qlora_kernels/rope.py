"""`qlora_kernels.apply_rotary`: transformers' apply_rotary_pos_emb through one kernel launch."""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import rope as ops
from .reference import rope as ref

# unsqueeze_dim -> whether q / k are [B, S, H, D] (True) or [B, H, S, D] (False)
_LAYOUTS = {1: False, -3: False, 2: True, -2: True}


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Rotary position embeddings of q and k, with the meaning and arguments of transformers'
    `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`.

    q [B, Hq, S, D] and k [B, Hk, S, D] (GQA: any head counts; with unsqueeze_dim=2,
    [B, S, H, D]), any strides; cos / sin [B or 1, S, rotary_dim] as transformers' rotary
    embeddings give them, one row per token, so position ids and packed sequences (positions
    restarting within a row) come in through them. rotary_dim (even) may be less than D:
    the rest of the head dim passes through (Phi-3's partial rotary). Returns (q_embed,
    k_embed) in q's dtype, laid out like q and k.

    One kernel rotates q and k (fp32 math, one rounding per element: in fp32 exactly stock's
    result, in bf16 / fp16 closer to the exact one than stock, which rounds each product); its
    backward is the inverse rotation and keeps nothing but cos and sin. Where the op would
    change stock's meaning, stock's formula runs instead (`reference.rope.apply_rotary`):
    cos / sin that require grad (the op does not differentiate them), or dtypes that stock
    would promote (fp32 cos with bf16 q gives stock an fp32 result).
    """
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(unsqueeze_dim, bool) or unsqueeze_dim not in _LAYOUTS:
        raise ValueError(f"unsqueeze_dim must be 1 (q / k [batch, heads, seq, head_dim]) or 2 ([batch, seq, heads, "
                         f"head_dim]), got {unsqueeze_dim!r}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return ref.apply_rotary(q, k, cos, sin, unsqueeze_dim)
    if cos.dtype in ops.DTYPES and sin.dtype in ops.DTYPES and q.dtype in ops.DTYPES and q.dtype == k.dtype and (
            torch.promote_types(q.dtype, cos.dtype) != q.dtype or torch.promote_types(q.dtype, sin.dtype) != q.dtype):
        return ref.apply_rotary(q, k, cos, sin, unsqueeze_dim)
    seq_major = _LAYOUTS[unsqueeze_dim]
    if seq_major:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"with unsqueeze_dim=2, q and k must be [batch, seq, heads, head_dim], got shapes "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cos.dim() == 3 and q.dim() == 4 and cos.shape == sin.shape and cos.shape[1] == 1 and q.shape[2] != 1:
        # one row for every position broadcasts over the sequence, as it does in stock
        cos, sin = (t.expand(t.shape[0], q.shape[2], t.shape[2]) for t in (cos, sin))
    q_embed, k_embed = ops.rope(q, k, cos, sin, False)
    if seq_major:
        q_embed, k_embed = q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    return q_embed, k_embed
