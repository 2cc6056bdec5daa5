"""`qlora-kernels bench`: run the suites, print the table, write JSON and PNG."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ..env import backends
from ..errors import JobFailed
from . import attention, decode, lora, loss, nf4
from .case import Case, other_baseline_ratios, other_ratios, shape_label
from .memory import cpu_peak_mb, cuda_peak_mb
from .source import source_commit
from .timing import default_device, device_name, median_ms, read_bandwidth_gbps, slug, warm_cpu_allocations

SUITES = {"nf4": nf4, "lora": lora, "attention": attention, "decode": decode, "loss": loss}


def measure(case: Case, device: torch.device, quick: bool, read_gbps: float) -> dict:
    """Check the case against its baseline, then time ours, the baseline (each of its variants)
    and `also` side by side: one row, whose baseline is the fastest variant."""
    try:
        case.check()
    except AssertionError as e:  # a wrong result is not timed
        raise JobFailed(f"{case.label}: {e}") from None
    ours_ms = median_ms(case.ours, device, quick)
    variants = {case.baseline_name: case.baseline, **case.baseline_variants}
    variant_ms = {name: median_ms(fn, device, quick) for name, fn in variants.items()}
    fastest = min(variant_ms, key=variant_ms.get)
    ms = {"ours": ours_ms, "baseline": variant_ms[fastest],
          **{name: median_ms(fn, device, quick) for name, fn in case.also.items()}}
    row = {"op": case.op, "shape": case.shape, **case.info, "dtype": case.dtype, "ours_ms": round(ms["ours"], 4),
           "baseline": fastest, "baseline_ms": round(ms["baseline"], 4),
           "ratio": round(ms["baseline"] / ms["ours"], 3), **{f"{name}_ms": round(ms[name], 4) for name in case.also}}
    if case.baseline_variants:
        row["baseline_variants_ms"] = {name: round(v, 4) for name, v in variant_ms.items()}
    row.update(other_baseline_ratios(case.other_baselines, ms))
    row.update(case.roofline(ms, read_gbps) if case.roofline else {"roofline": ""})
    peaks = _peaks(case, device)
    if peaks is not None:
        row["ours_peak_MB"], row["baseline_peak_MB"] = (round(p, 1) for p in peaks)
        row["peak_ratio"] = round(peaks[0] / peaks[1], 3) if peaks[1] > 0 else None
        note = f"peak {row['ours_peak_MB']} vs {row['baseline_peak_MB']} MB"
        if case.cpu_peak is not None:  # the suites that measure memory on every device: its ratio too
            note += f" ({row['peak_ratio']:.2f}x)" if row["peak_ratio"] is not None else ""
        row["roofline"] = f"{row['roofline']}; {note}" if row["roofline"] else note
    return row


def _peaks(case: Case, device: torch.device) -> tuple[float, float] | None:
    """Peak MB of ours and of the baseline: the CUDA allocator's, or on a CPU the peak RSS of a
    fresh process running the case's statements."""
    if device.type == "cuda" and case.peak_memory:
        return cuda_peak_mb(case.ours), cuda_peak_mb(case.baseline)
    if device.type == "cpu" and case.cpu_peak is not None:
        setup, ours, baseline = case.cpu_peak
        return cpu_peak_mb(setup, ours), cpu_peak_mb(setup, baseline)
    return None


def _suite_rows(suite: str, device: torch.device, quick: bool, read_gbps: float) -> Iterator[dict]:
    """The suite's rows, each as soon as it is measured."""
    for case in SUITES[suite].cases(device, quick):
        yield dict(measure(case, device, quick, read_gbps), suite=suite)
    if suite == "attention":
        yield dict(attention.peak_memory(device), suite=suite)  # memory of one long forward, not a timing
    if suite == "decode":
        yield dict(decode.generate_row(device, quick), suite=suite)  # whole generate() calls, timed interleaved


def _ms(value) -> str:
    return f"{value:>9.3f}" if value is not None else f"{'-':>9}"


def _table_head() -> str:
    head = f"{'op':<34} {'shape':<32} {'ours ms':>9} {'base ms':>9} {'ratio':>7}  {'roofline / note'}"
    return head + "\n" + "-" * (len(head) + 20)


def _table_line(r: dict) -> str:
    return (f"{r['op']:<34} {shape_label(r['shape']):<32} {_ms(r['ours_ms'])} {_ms(r['baseline_ms'])} "
            f"{r['ratio']:>6.2f}x  {r.get('roofline', '')}  [vs {r['baseline']}]{other_ratios(r)}")


def _plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op'].replace('nf4_', '').replace('flash_attention', 'attn')}\n{shape_label(r['shape'])}"
              for r in rows]
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


def run(what: str = "nf4", quick: bool = False, out_dir: str = "runs", device: str | None = None) -> Path:
    """Check and time the suite(s) `what`; writes `<out_dir>/bench-<device>[-<what>]-<date>.json`
    (with the git commit of the measured source) and a PNG (out_dir relative to the current
    folder) and returns the JSON's path. Rows are printed as they are measured. A suite where one
    of ours disagrees with its baseline stops there (a wrong result is not timed) and the next
    suite runs; the rows measured are written (the failures listed under "failed"), then
    JobFailed names the failures. Nothing is written when no row was measured."""
    dev = torch.device(device) if device else default_device()
    if dev.type == "cpu":
        warm_cpu_allocations()
    suites = list(SUITES) if what == "all" else [what]
    name = device_name(dev)
    print(f"bench {'+'.join(suites)} on {name}{' (quick)' if quick else ''}", flush=True)
    read_gbps = read_bandwidth_gbps(dev, quick)
    rows, failed = [], []
    print(_table_head(), flush=True)
    for suite in suites:
        try:
            for row in _suite_rows(suite, dev, quick, read_gbps):
                rows.append(row)
                print(_table_line(row), flush=True)
        except JobFailed as e:
            failed.append(str(e))
            print(f"{suite}: stopped, {e}", flush=True)
    print(f"measured read bandwidth: {read_gbps:.1f} GB/s")
    if not rows:
        raise JobFailed("; ".join(failed))

    date = dt.date.today().strftime("%Y%m%d")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{slug(name)}{'' if what == 'all' else '-' + what}-{date}{'-quick' if quick else ''}"
    result = {
        "device": name, "date": date, "quick": quick,
        "command": "python -m qlora_kernels bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else [what]),
        "source": source_commit(), "read_bandwidth_GBps": round(read_gbps, 1), "env": backends(), "rows": rows,
        "failed": failed,
        "cpu_allocations": "glibc heap, freed memory kept (no first-touch page faults)" if dev.type == "cpu" else None,
    }
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, f"qlora_kernels vs baselines, {name}, {date}", out / f"{stem}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    if failed:
        raise JobFailed("; ".join(failed))
    return path
