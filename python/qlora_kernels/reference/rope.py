"""Rotary position embeddings (RoPE) as transformers applies them: the executable spec.

`apply_rotary(q, k, cos, sin, unsqueeze_dim)` is transformers' `apply_rotary_pos_emb` of the
Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 and Phi-3 families (5.17 to 5.24), one
function for all of them:

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    x_embed = cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], -1)
    rotate_half(x) = cat([-x2, x1], -1), x1 / x2 the first / second half of x's last dim

with x_rot = x[..., :rotary_dim] and x_pass = x[..., rotary_dim:]. Phi-3 writes the partial
form (rotary_dim < head_dim, the rest passes through); the other families write
`q * cos + rotate_half(q) * sin`, which is the same function when rotary_dim == head_dim, as
their cos / sin always are. Position ids and packed sequences (positions restarting at 0
within a row) reach it only through cos / sin, one row per token: [batch or 1, seq, rotary_dim].

Rounding: stock computes in the dtype of its operands: q * cos, rotate_half(q) * sin and
their sum each rounded to q's dtype (transformers' rotary embedding casts cos / sin to it).
`apply_rotary` does the same, so in fp32 it is stock bit for bit. The kernels compute in
fp32 and round once (`apply_rotary_fp32`).

Per pair (x1_i, x2_i) of the rotated part, with c1 = cos[i], c2 = cos[i + half], s1, s2 alike:
    forward:   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
    backward (the transpose, a rotation by -theta when the halves of cos / sin are equal, as
    rotary embeddings make them):   dx1 = dy1 c1 + dy2 s2,   dx2 = dy2 c2 - dy1 s1
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    """transformers' rotate_half: (x1, x2) -> (-x2, x1) over the halves of the last dim."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """(q_embed, k_embed) exactly as transformers' apply_rotary_pos_emb computes them (Phi-3's
    partial form, which is the full one when cos.shape[-1] == head_dim), differentiable."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    if rotary_dim == q.shape[-1]:
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed


def rotate(x: Tensor, cos: Tensor, sin: Tensor, backward: bool = False) -> Tensor:
    """The op's meaning for one of q / k: x [B, H, S, D], cos / sin [B or 1, S, rotary_dim];
    the rotation (or with `backward` its transpose, applied to a gradient) of x[..., :rotary_dim]
    computed in fp32 and rounded once to x's dtype; x[..., rotary_dim:] passes through."""
    rotary_dim, half = cos.shape[-1], cos.shape[-1] // 2
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    x1, x2 = x[..., :half].float(), x[..., half:rotary_dim].float()
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    if backward:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    return torch.cat([y1.to(x.dtype), y2.to(x.dtype), x[..., rotary_dim:]], dim=-1)


def apply_rotary_fp32(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                      backward: bool = False) -> tuple[Tensor, Tensor]:
    """`rotate` of q and k: what every kernel computes (one fp32 rounding per element)."""
    return rotate(q, cos, sin, backward), rotate(k, cos, sin, backward)
