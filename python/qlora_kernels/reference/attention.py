"""Flash attention: the plain-PyTorch meaning (materializes S x S; for tests only).

Conventions shared by every kernel:
- q [B, Hq, Sq, D], k / v [B, Hkv, Sk, D], Hq a multiple of Hkv; query head h reads kv head
  h // (Hq // Hkv) (transformers' repeat_kv order).
- Query row i sits at absolute position r = i + (Sk - Sq) (bottom-right alignment: KV-cache
  decode and chunked prefill). Key j is kept when every one of these holds:
  causal: j <= r; window_size = (left, right): j >= r - left when left >= 0, j <= r + right
  when right >= 0 (-1 = unbounded on that side, flash-attn's meaning); key_padding_mask
  [B, Sk] bool, True = attend.
- Score s = softmax_scale * q.k; with softcap > 0, s = softcap * tanh(s / softcap) (Gemma 2);
  then ALiBi adds -slope[h] * |j - r| (flash-attn's symmetric form; under a causal mask it is
  Bloom's slope * (j - r), up to a per-row constant that softmax ignores).
- sinks [Hq] (transformers' s_aux): one more logit per head in every row's softmax
  denominator, attending to nothing: p_j = exp(s_j - lse), lse = log(sum_j exp(s_j) + exp(sink)).
- A row with no key kept gives out = 0, zero gradients (never NaN), and lse = -inf (= sink[h]
  with sinks).
- lse is fp32 [B, Hq, Sq]. A gradient flowing into lse (return_lse) is part of the backward:
  it enters as delta = rowsum(dO * O) - dlse.
- Varlen (packed sequences): q [Tq, Hq, D], k / v [Tk, Hkv, D] with int32 offsets cu_seqlens
  [N + 1] for q and cu_seqlens_k for k (None: the same as q's). Sequence b attends only within
  itself, with the alignment above per sequence; out [Tq, Hq, D], lse [Hq, Tq].
"""

from __future__ import annotations

import math

import torch

NO_WINDOW = (-1, -1)


def keep_mask(Sq: int, Sk: int, causal: bool, window_size: tuple[int, int] = NO_WINDOW,
              device: torch.device | str | None = None) -> torch.Tensor:
    """[Sq, Sk] bool: the keys each query row may see (causal and window, bottom-right aligned)."""
    row = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)
    col = torch.arange(Sk, device=device)[None, :]
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    left, right = window_size
    if causal:
        keep = keep & (col <= row)
    if left >= 0:
        keep = keep & (col >= row - left)
    if right >= 0:
        keep = keep & (col <= row + right)
    return keep


def _scores(q, k, causal, softmax_scale, alibi_slopes, key_padding_mask, window_size, softcap):
    """(scores [B, Hq, Sq, Sk] in the compute dtype, keep mask, scale, softcap's tanh or None)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(compute).repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.matmul(q.to(compute), kf.transpose(-1, -2)) * scale
    tanh = None
    if softcap > 0:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    if alibi_slopes is not None:
        row = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
        col = torch.arange(Sk, device=q.device)[None, :]
        scores = scores - alibi_slopes.to(compute).view(1, Hq, 1, 1) * (col - row).abs().to(compute)
    keep = keep_mask(Sq, Sk, causal, window_size, q.device).view(1, 1, Sq, Sk)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.bool().view(B, 1, 1, Sk)
    return scores, keep.expand(B, Hq, Sq, Sk), scale, tanh


def _probs(scores, keep, sinks):
    """(probs, lse): softmax over the kept keys (and the sink); rows with nothing get zeros."""
    masked = torch.where(keep, scores, torch.full_like(scores, -math.inf))
    logits = masked
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        logits = torch.cat([masked, sink], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    finite = torch.isfinite(lse)[..., None]
    probs = torch.where(keep & finite, torch.exp(masked - torch.where(finite, lse[..., None], 0)), 0)
    return probs, lse


def _sink_probs(sinks, lse):
    return torch.where(torch.isfinite(lse), torch.exp(sinks.to(lse.dtype).view(1, -1, 1) - lse), 0)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq]); differentiable by autograd (sinks too).

    Math in fp32 (fp64 for fp64 inputs, so gradcheck can use it); lse in that dtype.
    """
    scores, keep, _, _ = _scores(q, k, causal, softmax_scale, alibi_slopes, key_padding_mask, window_size, softcap)
    probs, lse = _probs(scores, keep, sinks)
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
    *,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dsinks) written out (no autograd), the algorithm every kernel follows:
    dV = Pᵀ dO, dP = dO Vᵀ, delta = rowsum(dO ⊙ O) − dlse, dS = P ⊙ (dP − delta),
    with softcap dS ⊙= 1 − tanh², dQ = scale · dS K, dK = scale · dSᵀ Q;
    dsink[h] = −Σ_rows exp(sink[h] − lse) · delta ([Hq] in the compute dtype, None without
    sinks);
    GQA sums dK, dV over the q heads of a kv head."""
    scores, keep, scale, tanh = _scores(q, k, causal, softmax_scale, alibi_slopes, key_padding_mask, window_size,
                                        softcap)
    probs, lse = _probs(scores, keep, sinks)
    group = q.shape[1] // k.shape[1]
    compute = scores.dtype
    kf, vf = (t.to(compute).repeat_interleave(group, dim=1) for t in (k, v))
    do = dout.to(compute)
    out = torch.matmul(probs, vf)
    delta = (do * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(compute)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    ds = probs * (dp - delta[..., None])
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)
    dq = scale * torch.matmul(ds, kf)
    dk = scale * torch.matmul(ds.transpose(-1, -2), q.to(compute))
    dv = torch.matmul(probs.transpose(-1, -2), do)
    dsinks = None
    if sinks is not None:
        dsinks = -(_sink_probs(sinks, lse) * delta).sum(dim=(0, 2))
    B, Hkv, Sk, D = k.shape

    def per_kv_head(t):
        return t.view(B, Hkv, group, Sk, D).sum(2)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype), dsinks


def _sequences(cu_seqlens, cu_seqlens_k):
    bounds_q = cu_seqlens.tolist()
    bounds_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else bounds_q
    return list(zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]))


def _seq(t, start, end):
    return t[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, S, D]


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences: (out [Tq, Hq, D], lse [Hq, Tq]), each sequence on its own."""
    outs, lses = [], []
    for q0, q1, k0, k1 in _sequences(cu_seqlens, cu_seqlens_k):
        o, l = flash_attention(_seq(q, q0, q1), _seq(k, k0, k1), _seq(v, k0, k1), causal, softmax_scale, alibi_slopes,
                               window_size=window_size, softcap=softcap, sinks=sinks)
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
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Packed sequences: (dq, dk, dv) in the [T, H, D] layout, and dsinks ([Hq] or None)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dsinks = None if sinks is None else torch.zeros(q.shape[1], dtype=compute, device=q.device)
    for q0, q1, k0, k1 in _sequences(cu_seqlens, cu_seqlens_k):
        g = flash_attention_backward(
            _seq(dout, q0, q1), _seq(q, q0, q1), _seq(k, k0, k1), _seq(v, k0, k1), causal, softmax_scale,
            alibi_slopes, window_size=window_size, softcap=softcap, sinks=sinks,
            dlse=None if dlse is None else dlse[:, q0:q1].unsqueeze(0))
        dq[q0:q1] = g[0][0].transpose(0, 1)
        dk[k0:k1] = g[1][0].transpose(0, 1)
        dv[k0:k1] = g[2][0].transpose(0, 1)
        if dsinks is not None:
            dsinks += g[3]
    return dq, dk, dv, dsinks
