"""Causal flash attention: the plain-PyTorch meaning (materializes S x S; for tests only).

Conventions shared by every kernel:
- q [B, Hq, Sq, D], k / v [B, Hkv, Sk, D], Hq a multiple of Hkv; query head h reads kv head
  h // (Hq // Hkv) (transformers' repeat_kv order).
- Query row i sits at absolute position i + (Sk - Sq): causal keeps keys j <= i + Sk - Sq
  (bottom-right alignment: KV-cache decode and chunked prefill).
- ALiBi: score += slope[h] * (j - (i + Sk - Sq)), i.e. -slope * distance (Bloom's bias up to a
  per-row constant, which softmax ignores).
- key_padding_mask [B, Sk] bool, True = attend.
- A row with no key left gives out = 0, lse = -inf, and zero gradients (never NaN).
- lse is fp32 [B, Hq, Sq]: log(sum_j exp(score_ij)) with scores already scaled.
- Varlen (packed sequences): q / k / v [T, H, D] with cu_seqlens [N + 1] int32 offsets; each
  sequence attends only within itself (causal, self-attention: Sq = Sk per sequence);
  out [T, Hq, D], lse [Hq, T].
"""

from __future__ import annotations

import math

import torch


def _scores(q, k, causal, softmax_scale, alibi_slopes, key_padding_mask):
    """Scaled scores [B, Hq, Sq, Sk] in the compute dtype, the keep mask and rows with a key."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(compute).repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.matmul(q.to(compute), kf.transpose(-1, -2)) * scale
    row = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
    col = torch.arange(Sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.to(compute).view(1, Hq, 1, 1) * (col - row).to(compute)
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & (col <= row)
    keep = keep.view(1, 1, Sq, Sk)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.bool().view(B, 1, 1, Sk)
    keep = keep.expand(B, Hq, Sq, Sk)
    return scores, keep, keep.any(dim=-1, keepdim=True), scale


def _probs(scores, keep, any_key):
    # rows with no key: softmax over zeros, then zeroed, so no NaN reaches values or grads
    masked = torch.where(keep, scores, torch.full_like(scores, -math.inf))
    safe = torch.where(any_key, masked, torch.zeros_like(scores))
    lse = torch.where(any_key.squeeze(-1), torch.logsumexp(safe, dim=-1), torch.full_like(scores[..., 0], -math.inf))
    return torch.softmax(safe, dim=-1) * any_key, lse


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq]); differentiable by autograd.

    Math in fp32 (fp64 for fp64 inputs, so gradcheck can use it); lse in that dtype.
    """
    scores, keep, any_key, _ = _scores(q, k, causal, softmax_scale, alibi_slopes, key_padding_mask)
    probs, lse = _probs(scores, keep, any_key)
    vf = v.to(scores.dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.matmul(probs, vf).to(q.dtype), lse


def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) written out (no autograd), the algorithm every kernel follows:
    dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = scale · dS K, dK = scale · dSᵀ Q;
    GQA sums dK, dV over the q heads of a kv head."""
    scores, keep, any_key, scale = _scores(q, k, causal, softmax_scale, alibi_slopes, key_padding_mask)
    probs, _ = _probs(scores, keep, any_key)
    group = q.shape[1] // k.shape[1]
    compute = scores.dtype
    kf, vf = (t.to(compute).repeat_interleave(group, dim=1) for t in (k, v))
    do = dout.to(compute)
    out = torch.matmul(probs, vf)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    ds = probs * (dp - (do * out).sum(-1, keepdim=True))
    dq = scale * torch.matmul(ds, kf)
    dk = scale * torch.matmul(ds.transpose(-1, -2), q.to(compute))
    dv = torch.matmul(probs.transpose(-1, -2), do)
    B, Hkv, Sk, D = k.shape

    def per_kv_head(t):
        return t.view(B, Hkv, group, Sk, D).sum(2)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences: (out [T, Hq, D], lse [Hq, T]), each sequence on its own."""
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        def seq(t):
            return t[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, S, D]

        o, l = flash_attention(seq(q), seq(k), seq(v), causal, softmax_scale, alibi_slopes)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def flash_attention_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed sequences: (dq, dk, dv) in the [T, H, D] layout."""
    grads = ([], [], [])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        def seq(t):
            return t[start:end].transpose(0, 1).unsqueeze(0)

        for acc, g in zip(grads, flash_attention_backward(seq(dout), seq(q), seq(k), seq(v), causal, softmax_scale,
                                                          alibi_slopes)):
            acc.append(g[0].transpose(0, 1))
    return tuple(torch.cat(g, dim=0) for g in grads)
