"""Peak memory of one call: CUDA allocator peak on GPU, a fresh process's peak RSS on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def cuda_peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_peak_mb(setup: str, stmt: str) -> float:
    """Peak RSS growth (MB) of `stmt` after `setup`, in a fresh interpreter (RSS peaks never
    go down, so each measurement needs its own process)."""
    code = (
        "import json, resource, torch, qlora_kernels as qk\n"
        f"{setup}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"{stmt}\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps((after - before) / 1024))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))
