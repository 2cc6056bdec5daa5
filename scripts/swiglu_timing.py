"""SwiGLU against transformers' expression on this machine: time of forward + backward and the
bytes autograd keeps for the backward, per call.

    python scripts/swiglu_timing.py [--tokens 2048] [--intermediate 11008] [--dtype bfloat16]
                                    [--activation silu] [--device cpu] [--repeats 5]

Stock is `act(gate) * up` as Llama's / Gemma's MLP computes it (autograd keeps gate, up and
act(gate)); ours is `qlora_kernels.swiglu` (keeps gate and up). Prints the median of `repeats`
runs after one warm-up (CPU allocations kept in glibc's heap, as `qlora-kernels bench` does),
and the saved bytes counted through torch.autograd.graph.saved_tensors_hooks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import qlora_kernels as qk
from qlora_kernels.bench.timing import warm_cpu_allocations
from qlora_kernels.reference import swiglu as ref


def saved_bytes(fn, gate, up) -> int:
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(gate, up)
    return sum(seen.values())


def median_ms(fn, gate, up, dout, device, repeats) -> float:
    def step():
        gate.grad = up.grad = None
        fn(gate, up).backward(dout)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--activation", default="silu", choices=list(ref.ACTIVATIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        warm_cpu_allocations()  # as `qlora-kernels bench`: no first-touch page faults in the timings
    shape = (args.tokens, args.intermediate)
    gate = torch.randn(shape, device=device).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    dout = torch.randn(shape, device=device).to(dtype)
    sides = {"stock": lambda g, u: ref.swiglu(g, u, args.activation),
             "qlora_kernels": lambda g, u: qk.swiglu(g, u, args.activation)}
    print(f"{args.activation} {args.dtype} {list(shape)} on {device} ({torch.get_num_threads()} threads)")
    for name, fn in sides.items():
        ms = median_ms(fn, gate, up, dout, device, args.repeats)
        print(f"{name:>14}: fwd+bwd {ms:8.2f} ms, saved for backward {saved_bytes(fn, gate, up) / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
