"""RMSNorm: `qlora_kernels.rms_norm` against transformers' own modules, forward + backward.

    python scripts/bench_rms_norm.py [--rows 4096] [--hidden 4096] [--repeats 20] [--device cpu]

For LlamaRMSNorm's and GemmaRMSNorm's rounding, bf16 activations, the weight trainable (full
fine-tuning) and frozen (QLoRA): the median time of a forward + backward, and the bytes autograd
keeps for the backward (each storage counted once, the input and the weight, which exist anyway,
left out). Prints one row per case.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import qlora_kernels as qk


def saved_bytes(fn, x, w) -> int:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in (x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()):
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w)
    return total


def median_seconds(fn, x, w, dy, repeats: int) -> float:
    def sync():
        if x.is_cuda:
            torch.cuda.synchronize()

    times = []
    for i in range(repeats + 2):
        x.grad = w.grad = None
        sync()
        start = time.perf_counter()
        fn(x, w).backward(dy)
        sync()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    print(f"rows={args.rows} hidden={args.hidden} bf16 device={args.device} threads={torch.get_num_threads()}")
    print(f"{'case':<28} {'stock ms':>9} {'ours ms':>8} {'speed-up':>8} {'stock saved MiB':>16} {'ours saved MiB':>15}")
    for name, cls, offset, cast_before_weight in (("llama", LlamaRMSNorm, 0.0, True),
                                                  ("gemma", GemmaRMSNorm, 1.0, False)):
        module = cls(args.hidden, eps=1e-6).to(device=args.device, dtype=torch.bfloat16)

        def stock(x, w):
            return module(x)

        def ours(x, w):
            return qk.rms_norm(x, w, 1e-6, offset, cast_before_weight)

        for trainable in (True, False):
            module.weight.requires_grad_(trainable)
            x = torch.randn(args.rows, args.hidden, device=args.device, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn_like(x)
            w = module.weight
            t_stock, t_ours = (median_seconds(f, x, w, dy, args.repeats) for f in (stock, ours))
            b_stock, b_ours = (saved_bytes(f, x, w) for f in (stock, ours))
            case = f"{name} weight {'trainable' if trainable else 'frozen'}"
            print(f"{case:<28} {t_stock * 1e3:>9.2f} {t_ours * 1e3:>8.2f} {t_stock / t_ours:>7.2f}x "
                  f"{b_stock / 2**20:>16.1f} {b_ours / 2**20:>15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
