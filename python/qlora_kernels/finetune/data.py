"""The finetune job's training data: byte-level tokens of the Python standard library's .py
sources, which every machine has (no download)."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sysconfig
from pathlib import Path

import torch

from ..errors import JobFailed

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_sources() -> list[Path]:
    """The standard library's .py files in a fixed order (test suites and installed packages
    left out: some distributions ship them separately)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def make_batches(steps: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    """[steps, batch, seq] byte ids: the first steps * batch * seq bytes of the standard
    library's sources cut into sequences, in a seeded order. Same arguments, same batches."""
    need = steps * batch_size * seq_len
    chunks, have, used = [], 0, 0
    for path in stdlib_sources():
        data = path.read_bytes()
        chunks.append(data)
        have += len(data)
        used += 1
        if have >= need:
            break
    text = b"".join(chunks)
    if not text:
        raise JobFailed(f"no .py sources under {sysconfig.get_paths()['stdlib']} to train on")
    repeats = math.ceil(need / len(text))
    text = (text * repeats)[:need]
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).view(steps * batch_size, seq_len)
    order = torch.randperm(steps * batch_size, generator=torch.Generator().manual_seed(seed))
    info = {"source": "Python standard library .py files (sysconfig stdlib), byte-level",
            "stdlib": sysconfig.get_paths()["stdlib"], "python": platform.python_version(), "files": used,
            "bytes": need, "repeated": repeats > 1, "sha256": hashlib.sha256(text).hexdigest()}
    return ids[order].view(steps, batch_size, seq_len).clone(), info
