"""Flash attention: ours vs SDPA (and FlexAttention on GPU) on the same device."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..attention import flash_attention
from .memory import cpu_peak_mb, cuda_peak_mb
from .timing import median_ms


def _flops(batch, heads, seq_q, seq_k, head_dim, causal, backward):
    pairs = seq_q * seq_k / (2 if causal and seq_q == seq_k else 1)
    fwd = 4 * batch * heads * pairs * head_dim
    return fwd * (3.5 if backward else 1.0)  # bwd = 2.5x fwd


def _check(ours, theirs, name):
    err = (ours.float() - theirs.float()).abs().max().item()
    scale = theirs.float().abs().max().item() + 1e-6
    if not err <= 2e-2 * scale:
        raise AssertionError(f"{name}: ours differs from the baseline by {err:.3g} (scale {scale:.3g})")


def _sdpa_gqa(q, k, v, **kw):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kw)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(q, k, v, seq):
    """Compiled FlexAttention with a causal block mask and native GQA (GPU only)."""
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq, seq, device=q.device)
    return lambda: _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=True)


def _time_pair(ours, theirs, device, quick, backward, tensors):
    def with_backward(fn):
        def run():
            out = fn()
            out.backward(torch.ones_like(out))
            for t in tensors:
                t.grad = None
        return run

    if backward:
        ours, theirs = with_backward(ours), with_backward(theirs)
    return median_ms(ours, device, quick), median_ms(theirs, device, quick)


def bench(device: torch.device, quick: bool, copy_gbps: float) -> list[dict]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16
    if gpu:
        seqs = (512, 2048, 4096) if quick else (512, 2048, 4096, 8192, 16384)
        heads_q, heads_kv, batch = 32, 8, 1
        head_dims = (64, 128)
    else:
        seqs = (512,) if quick else (512, 1024, 2048)
        heads_q, heads_kv, batch = 8, 2, 1
        head_dims = (64,)
    rows = []
    for head_dim in head_dims:
        for seq in seqs:
            for backward in (False, True):
                q, k, v = (torch.randn(batch, h, seq, head_dim, device=device, dtype=dtype, requires_grad=backward)
                           for h in (heads_q, heads_kv, heads_kv))
                ours = lambda: flash_attention(q, k, v)  # noqa: E731
                theirs = lambda: _sdpa_gqa(q, k, v, is_causal=True)  # noqa: E731
                if not backward:
                    _check(ours(), theirs(), f"attention s={seq} d={head_dim}")
                ours_ms, base_ms = _time_pair(ours, theirs, device, quick, backward, (q, k, v))
                tflops = _flops(batch, heads_q, seq, seq, head_dim, True, backward) / ours_ms / 1e9
                row = {
                    "op": "flash_attention " + ("fwd+bwd" if backward else "fwd"),
                    "shape": f"b{batch} h{heads_q}/{heads_kv} s{seq} d{head_dim}", "dtype": "bfloat16",
                    "ours_ms": round(ours_ms, 4), "baseline": "SDPA (is_causal, GQA by repeat)",
                    "baseline_ms": round(base_ms, 4), "ratio": round(base_ms / ours_ms, 3),
                    "roofline": f"{tflops:.3f} TFLOP/s", "TFLOPs": round(tflops, 4),
                }
                if gpu:
                    flex = _flex(q, k, v, seq)
                    _, flex_ms = _time_pair(ours, flex, device, quick, backward, (q, k, v))
                    row["flex_attention_ms"] = round(flex_ms, 4)
                    row["ratio_vs_flex"] = round(flex_ms / ours_ms, 3)
                rows.append(row)
    rows += _alibi(device, quick, dtype)
    rows += _decode(device, quick, dtype)
    rows += _memory(device, dtype)
    return rows


def _alibi(device, quick, dtype):
    """Bloom's case: ALiBi in-kernel vs SDPA with a materialized [B, H, S, S] bias."""
    seq = (1024 if quick else 2048) if device.type == "cuda" else 512
    heads, head_dim = (16, 64) if device.type == "cuda" else (8, 64)
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
    slopes = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)], device=device)
    pos = torch.arange(seq, device=device)
    causal = pos[None, :] <= pos[:, None]

    def materialized():
        bias = slopes.view(1, heads, 1, 1) * (pos[None, :] - pos[:, None]).to(torch.float32)
        bias = bias.masked_fill(~causal, -math.inf).to(dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    ours = lambda: flash_attention(q, k, v, alibi_slopes=slopes)  # noqa: E731
    _check(ours(), materialized(), "alibi")
    ours_ms, base_ms = median_ms(ours, device, quick), median_ms(materialized, device, quick)
    row = {"op": "flash_attention ALiBi fwd", "shape": f"b1 h{heads} s{seq} d{head_dim}", "dtype": "bfloat16",
           "ours_ms": round(ours_ms, 4), "baseline": "SDPA + materialized bias", "baseline_ms": round(base_ms, 4),
           "ratio": round(base_ms / ours_ms, 3), "roofline": ""}
    if device.type == "cuda":
        row["ours_peak_MB"] = round(cuda_peak_mb(ours), 1)
        row["baseline_peak_MB"] = round(cuda_peak_mb(materialized), 1)
        row["roofline"] = f"peak {row['ours_peak_MB']} vs {row['baseline_peak_MB']} MB"
    return [row]


def _decode(device, quick, dtype):
    """One new token against a KV cache: ours (split-K on GPU) vs SDPA."""
    caches = ((4096,) if quick else (4096, 16384)) if device.type == "cuda" else (4096,)
    heads_q, heads_kv, head_dim = (32, 8, 128) if device.type == "cuda" else (8, 2, 64)
    rows = []
    for cache in caches:
        q = torch.randn(1, heads_q, 1, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(1, heads_kv, cache, head_dim, device=device, dtype=dtype) for _ in range(2))
        ours = lambda: flash_attention(q, k, v)  # noqa: E731
        theirs = lambda: _sdpa_gqa(q, k, v)  # noqa: E731  (one query at the end sees every key)
        _check(ours(), theirs(), f"decode cache={cache}")
        ours_ms, base_ms = median_ms(ours, device, quick), median_ms(theirs, device, quick)
        gbps = 2 * k.numel() * k.element_size() / ours_ms / 1e6
        rows.append({"op": "flash_attention decode", "shape": f"q1 cache{cache} h{heads_q}/{heads_kv} d{head_dim}",
                     "dtype": "bfloat16", "ours_ms": round(ours_ms, 4), "baseline": "SDPA (GQA by repeat)",
                     "baseline_ms": round(base_ms, 4), "ratio": round(base_ms / ours_ms, 3),
                     "roofline": f"{gbps:.1f} GB/s of KV read"})
    return rows


def _memory(device, dtype):
    """Peak memory of one forward at a long sequence: ours and SDPA (O(N) where its flash
    backend applies) against plain attention, which materializes the S x S scores."""
    seq, heads, head_dim = (16384, 32, 128) if device.type == "cuda" else (8192, 1, 64)
    name = str(dtype).split(".")[-1]
    plain = ("s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5\n"
             "s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float('-inf'))\n"
             "torch.softmax(s.float(), -1).to(q.dtype) @ v")
    if device.type == "cuda":
        q, k, v = (torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
        ours = cuda_peak_mb(lambda: flash_attention(q, k, v))
        sdpa = cuda_peak_mb(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        eager = None  # 32 x 16k x 16k fp32 scores would not fit; the S x S size is the point
    else:
        setup = f"q, k, v = (torch.randn(1, {heads}, {seq}, {head_dim}, dtype=torch.{name}) for _ in range(3))"
        ours = cpu_peak_mb(setup, "qk.flash_attention(q, k, v)")
        sdpa = cpu_peak_mb(setup, "torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)")
        eager = cpu_peak_mb(setup, plain)
    note = f"peak {ours:.1f} MB vs SDPA {sdpa:.1f} MB" + (f" vs plain softmax {eager:.1f} MB" if eager else "")
    return [{"op": "flash_attention fwd peak memory", "shape": f"b1 h{heads} s{seq} d{head_dim}", "dtype": name,
             "ours_ms": None, "baseline": "SDPA" + (" / plain softmax attention" if eager else ""),
             "baseline_ms": None, "ratio": round(sdpa / max(ours, 1e-3), 2), "roofline": note,
             "ours_peak_MB": round(ours, 1), "sdpa_peak_MB": round(sdpa, 1),
             "plain_attention_peak_MB": None if eager is None else round(eager, 1)}]
