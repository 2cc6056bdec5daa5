"""`qlora-kernels bench`: run the suites, print the table, write JSON and PNG."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import torch

from ..env import backends
from . import attention, lora, nf4
from .timing import copy_bandwidth_gbps, device_name, slug

SUITES = {"nf4": nf4.bench, "lora": lora.bench, "attention": attention.bench}


def _shape(r: dict) -> str:
    return "x".join(map(str, r["shape"])) if isinstance(r["shape"], list) else r["shape"]


def _ms(value) -> str:
    return f"{value:>9.3f}" if value is not None else f"{'-':>9}"


def _table(rows: list[dict]) -> str:
    head = f"{'op':<34} {'shape':<32} {'ours ms':>9} {'base ms':>9} {'ratio':>7}  {'roofline / note'}"
    lines = [head, "-" * (len(head) + 20)]
    for r in rows:
        lines.append(f"{r['op']:<34} {_shape(r):<32} {_ms(r['ours_ms'])} {_ms(r['baseline_ms'])} "
                     f"{r['ratio']:>6.2f}x  {r.get('roofline', '')}  [vs {r['baseline']}]")
    return "\n".join(lines)


def _plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op'].replace('nf4_', '').replace('flash_attention', 'attn')}\n{_shape(r)}" for r in rows]
    ops = sorted({r["op"] for r in rows})
    colors = [f"C{ops.index(r['op'])}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4.5))
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], color=colors)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("speed-up vs baseline (x, log)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _warm_cpu_allocations() -> None:
    """Serve CPU allocations from glibc's heap and keep freed memory, as a caching allocator
    does: otherwise each fresh output above glibc's (moving) mmap threshold is page-faulted in,
    which costs more than the kernels themselves and flips between runs (one bitsandbytes
    dequantize of 4096x4096 was timed at 3 ms and at 18 ms depending on the heap's history)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 34)


def run(what: str = "nf4", quick: bool = False, out_dir: str = "benchmarks/results",
        device: str | None = None) -> Path:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        _warm_cpu_allocations()
    suites = list(SUITES) if what == "all" else [what]
    name = device_name(dev)
    print(f"bench {'+'.join(suites)} on {name}{' (quick)' if quick else ''}", flush=True)
    copy_gbps = copy_bandwidth_gbps(dev, quick)
    rows = []
    for suite in suites:
        rows += [dict(r, suite=suite) for r in SUITES[suite](dev, quick, copy_gbps)]
    print(_table(rows))
    print(f"measured copy bandwidth: {copy_gbps:.1f} GB/s (read + write)")

    date = dt.date.today().strftime("%Y%m%d")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(name)}-{date}{'-quick' if quick else ''}"
    result = {
        "device": name, "date": date, "quick": quick,
        "command": "python -m qlora_kernels bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else [what]),
        "copy_bandwidth_GBps": round(copy_gbps, 1), "env": backends(), "rows": rows,
        "cpu_allocations": "glibc heap, freed memory kept (no first-touch page faults)" if dev.type == "cpu" else None,
    }
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, f"qlora_kernels vs baselines, {name}, {date}", out / f"{stem}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path
