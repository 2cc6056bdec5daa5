"""Rotary embeddings: `qlora_kernels.apply_rotary` against transformers' apply_rotary_pos_emb.

    python scripts/bench_rope.py [--device cpu|cuda] [--repeats N]

For Llama-2-7B (32 q / 32 kv heads) and Llama-3-8B (32 / 8, GQA) attention at sequence 2048,
head dim 128, bf16, q and k as transformers passes them ([B, H, S, D] views of [B, S, H, D]):
the median time of the forward and of forward + backward, each side checked against the other
first, and the bytes autograd saves for the backward (both keep only cos and sin) and the peak
bytes the forward allocates beyond its outputs (CUDA only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import qlora_kernels as qk
from qlora_kernels.reference.rope import apply_rotary as stock_formula

SHAPES = {"llama-2-7b": (32, 32), "llama-3-8b (GQA)": (32, 8)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats):
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    print(f"device {device}, threads {torch.get_num_threads()}, seq {args.seq}, head_dim 128, bf16")
    print(f"{'shape':<18} {'pass':<10} {'stock ms':>9} {'ours ms':>8} {'ratio':>6} {'saved MB stock/ours':>20}")
    for name, (hq, hk) in SHAPES.items():
        S, D = args.seq, 128
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, S, hq, D, generator=g).to(device, torch.bfloat16).transpose(1, 2).requires_grad_()
        k = torch.randn(1, S, hk, D, generator=g).to(device, torch.bfloat16).transpose(1, 2).requires_grad_()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        freqs = torch.arange(S, dtype=torch.float32)[None, :, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(device, torch.bfloat16), emb.sin().to(device, torch.bfloat16)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        sides = {"stock": apply_rotary_pos_emb, "ours": qk.apply_rotary}
        (sq, sk), (oq, ok) = (fn(q, k, cos, sin) for fn in sides.values())
        exact = stock_formula(*(t.detach().double() for t in (q, k, cos, sin)))
        for ours, stock, e in zip((oq, ok), (sq, sk), exact):
            assert (ours.double() - e).abs().max() <= 2 * (stock.double() - e).abs().max() + 1e-6
        row = {}
        for side, fn in sides.items():
            with torch.no_grad():
                fwd = median_ms(lambda: fn(q, k, cos, sin), device, args.repeats)
            both = median_ms(lambda: torch.autograd.backward(fn(q, k, cos, sin), (dq, dk)), device, args.repeats)
            row[side] = (fwd, both, saved_bytes(lambda: fn(q, k, cos, sin)) / 2**20)
        for i, label in enumerate(("forward", "fwd+bwd")):
            print(f"{name:<18} {label:<10} {row['stock'][i]:>9.3f} {row['ours'][i]:>8.3f} "
                  f"{row['stock'][i] / row['ours'][i]:>6.2f} {row['stock'][2]:>9.2f} / {row['ours'][2]:.2f}")


if __name__ == "__main__":
    main()
