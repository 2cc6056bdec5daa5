"""Peak memory of one call: CUDA allocator peak on GPU, a fresh process's peak RSS on CPU."""

from __future__ import annotations

import json
import os
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
    """Peak RSS growth (MB) of `stmt` after `setup`, in a fresh interpreter: Linux's peak RSS
    (VmHWM) is reset through /proc/self/clear_refs just before the statement, and freed memory
    goes back to the system at once (mmap threshold 64 KiB), so nothing earlier hides it.
    `stmt` runs once before the measurement: first calls import and initialize (torch's
    custom-op machinery alone adds ~140 MB once), which is not the statement's memory."""
    code = (
        "import json, torch, qlora_kernels as qk\n"
        f"{setup}\n"
        f"{stmt}\n"
        "def kib(field):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(field))\n"
        "    return int(line.split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kib('VmRSS')\n"
        f"{stmt}\n"
        "print(json.dumps((kib('VmHWM') - before) / 1024))\n"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))
