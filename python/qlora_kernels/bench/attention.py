"""Flash attention: ours vs SDPA (and FlexAttention on GPU) on the same device."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ..attention import flash_attention
from .case import Case, bandwidth, close_check, step
from .memory import cpu_peak_mb, cuda_peak_mb


def _flops(batch, heads, seq_q, seq_k, head_dim, causal, backward):
    pairs = seq_q * seq_k / (2 if causal and seq_q == seq_k else 1)
    fwd = 4 * batch * heads * pairs * head_dim
    return fwd * (3.5 if backward else 1.0)  # bwd = 2.5x fwd


def _sdpa_gqa(q, k, v, **kw):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kw)


def _sdpa_variants(q, k, v, what: str, grad_of=(), **kw) -> tuple[dict, Callable[[], None]]:
    """The ways transformers runs SDPA over GQA without a mask, by name (K/V repeated per query
    head, or enable_gqa=True, which transformers passes when there is no mask), and a check
    that ours (`flash_attention(q, k, v)`) matches each."""
    repeat = lambda: _sdpa_gqa(q, k, v, **kw)  # noqa: E731
    native = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)  # noqa: E731
    variants = {f"SDPA ({what}GQA by repeat)": repeat, f"SDPA ({what}enable_gqa=True)": native}
    ours = lambda: flash_attention(q, k, v)  # noqa: E731
    checks = [close_check(ours, fn, grad_of, grad_of) for fn in variants.values()]

    def check():
        for c in checks:
            c()
    return variants, check


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(q, k, v, seq):
    """Compiled FlexAttention with a causal block mask and native GQA (GPU only)."""
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq, seq, device=q.device)
    return lambda: _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=True)


def cases(device: torch.device, quick: bool) -> Iterator[Case]:
    gpu = device.type == "cuda"
    if gpu:
        seqs = (512, 2048, 4096) if quick else (512, 2048, 4096, 8192, 16384)
        heads_q, heads_kv, batch = 32, 8, 1
        head_dims = (64, 128)
    else:
        seqs = (512,) if quick else (512, 1024, 2048)
        heads_q, heads_kv, batch = 8, 2, 1
        head_dims = (64,)
    for head_dim in head_dims:
        for seq in seqs:
            for backward in (False, True):
                yield _causal(device, batch, heads_q, heads_kv, seq, head_dim, backward)
    yield from _sliding_window(device, quick)
    yield _alibi(device, quick)
    yield from _decode(device, quick)


def _causal(device, batch, heads_q, heads_kv, seq, head_dim, backward) -> Case:
    """Causal GQA self-attention, ours vs SDPA (the faster of its two GQA forms; FlexAttention as
    well on GPU); forward or a training step."""
    q, k, v = (torch.randn(batch, h, seq, head_dim, device=device, dtype=torch.bfloat16, requires_grad=backward)
               for h in (heads_q, heads_kv, heads_kv))
    ours = lambda: flash_attention(q, k, v)  # noqa: E731
    grad_of = (q, k, v) if backward else ()
    variants, check = _sdpa_variants(q, k, v, "is_causal, ", grad_of, is_causal=True)
    (repeat_name, repeat), (native_name, native) = variants.items()
    flops = _flops(batch, heads_q, seq, seq, head_dim, True, backward)

    def roofline(ms: dict[str, float], read_gbps: float) -> dict:
        tflops = flops / ms["ours"] / 1e9
        return {"roofline": f"{tflops:.3f} TFLOP/s", "TFLOPs": round(tflops, 4)}

    gpu = device.type == "cuda"
    return Case(
        op="flash_attention " + ("fwd+bwd" if backward else "fwd"),
        shape=f"b{batch} h{heads_q}/{heads_kv} s{seq} d{head_dim}", dtype="bfloat16",
        ours=step(ours, grad_of), baseline=step(repeat, grad_of), baseline_name=repeat_name,
        baseline_variants={native_name: step(native, grad_of)}, check=check, roofline=roofline,
        also={"flex_attention": step(_flex(q, k, v, seq), grad_of)} if gpu else {},
        other_baselines={"flex_attention": "compiled FlexAttention"} if gpu else {},
    )


def _sliding_window(device, quick) -> Iterator[Case]:
    """Causal sliding window (Mistral's): ours skips the key blocks outside the window, so its
    time grows with S * W where full causal attention grows with S^2; SDPA takes the band as a
    materialized mask and pays for S^2."""
    if device.type == "cuda":
        window, seqs = 4096, ((8192,) if quick else (8192, 16384))
        heads_q, heads_kv, head_dim = 32, 8, 128
    else:
        window, seqs = 256, ((1024, 2048) if quick else (1024, 2048, 4096))
        heads_q, heads_kv, head_dim = 8, 2, 64
    for seq in seqs:
        yield _sliding_window_case(device, seq, window, heads_q, heads_kv, head_dim)


def _sliding_window_case(device, seq, window, heads_q, heads_kv, head_dim) -> Case:
    q, k, v = (torch.randn(1, h, seq, head_dim, device=device, dtype=torch.bfloat16)
               for h in (heads_q, heads_kv, heads_kv))
    pos = torch.arange(seq, device=device)
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - window)
    ours = lambda: flash_attention(q, k, v, window_size=(window, 0))  # noqa: E731
    full_causal = lambda: flash_attention(q, k, v)  # noqa: E731
    sdpa = lambda: _sdpa_gqa(q, k, v, attn_mask=band)  # noqa: E731
    pairs = heads_q * sum(min(i, window) + 1 for i in range(seq))  # query-key pairs inside the band

    def roofline(ms: dict[str, float], read_gbps: float) -> dict:
        share = ms["ours"] / ms["ours_full_causal"]
        return {"roofline": f"{ms['ours'] * 1e6 / pairs:.2f} ns per pair in the band; {share:.2f} of full causal "
                            f"({ms['ours_full_causal']:.1f} ms)", "share_of_full_causal": round(share, 3)}

    return Case(op="flash_attention sliding window fwd", shape=f"b1 h{heads_q}/{heads_kv} s{seq} w{window} d{head_dim}",
                dtype="bfloat16", ours=ours, baseline=sdpa, baseline_name="SDPA + materialized band mask",
                check=close_check(ours, sdpa), roofline=roofline, also={"ours_full_causal": full_causal},
                info={"window": window})


def _alibi(device, quick) -> Case:
    """Bloom's case: ALiBi in-kernel vs SDPA with a materialized [1, H, S, S] bias, built once
    outside the timed call as Bloom builds it once per forward for all its layers."""
    dtype = torch.bfloat16
    seq = (1024 if quick else 2048) if device.type == "cuda" else 512
    heads, head_dim = (16, 64) if device.type == "cuda" else (8, 64)
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
    slopes = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)], device=device)
    pos = torch.arange(seq, device=device)
    causal = pos[None, :] <= pos[:, None]
    bias = slopes.view(1, heads, 1, 1) * (pos[None, :] - pos[:, None]).to(torch.float32)
    bias = bias.masked_fill(~causal, -math.inf).to(dtype)
    materialized = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # noqa: E731
    ours = lambda: flash_attention(q, k, v, alibi_slopes=slopes)  # noqa: E731
    return Case(op="flash_attention ALiBi fwd", shape=f"b1 h{heads} s{seq} d{head_dim}", dtype="bfloat16",
                ours=ours, baseline=materialized, baseline_name="SDPA + materialized bias (built once)",
                check=close_check(ours, materialized), peak_memory=device.type == "cuda")


def _decode(device, quick) -> Iterator[Case]:
    """One new token against a KV cache: ours (split-K on GPU) vs SDPA."""
    caches = ((4096,) if quick else (4096, 16384)) if device.type == "cuda" else (4096,)
    heads_q, heads_kv, head_dim = (32, 8, 128) if device.type == "cuda" else (8, 2, 64)
    for cache in caches:
        yield _decode_case(device, cache, heads_q, heads_kv, head_dim)


def _decode_case(device, cache, heads_q, heads_kv, head_dim) -> Case:
    q = torch.randn(1, heads_q, 1, head_dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, heads_kv, cache, head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    ours = lambda: flash_attention(q, k, v)  # noqa: E731
    # one query at the end sees every key: no mask, so transformers may pass enable_gqa
    variants, check = _sdpa_variants(q, k, v, "")
    (repeat_name, repeat), (native_name, native) = variants.items()
    kv_bytes = 2 * k.numel() * k.element_size()
    return Case(op="flash_attention decode", shape=f"q1 cache{cache} h{heads_q}/{heads_kv} d{head_dim}",
                dtype="bfloat16", ours=ours, baseline=repeat, baseline_name=repeat_name,
                baseline_variants={native_name: native}, check=check,
                roofline=lambda ms, read_gbps: bandwidth(kv_bytes, ms["ours"], read_gbps))


def peak_memory(device: torch.device) -> dict:
    """Peak memory of one forward at a long sequence: ours and SDPA (O(N) where its flash
    backend applies) against plain attention, which materializes the S x S scores."""
    dtype = torch.bfloat16
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
    return {"op": "flash_attention fwd peak memory", "shape": f"b1 h{heads} s{seq} d{head_dim}", "dtype": name,
            "ours_ms": None, "baseline": "SDPA" + (" / plain softmax attention" if eager else ""),
            "baseline_ms": None, "ratio": round(sdpa / max(ours, 1e-3), 2), "roofline": note,
            "ours_peak_MB": round(ours, 1), "sdpa_peak_MB": round(sdpa, 1),
            "plain_attention_peak_MB": None if eager is None else round(eager, 1)}
