"""The two Python parts of scripts/gpu_check.sh: the CUDA gate and the summary.

    python3 scripts/gpu_summary.py gate ENV_JSON ARCHS   # exit 0 when the CUDA path can run, else the reason
    python3 scripts/gpu_summary.py write OUTDIR          # OUTDIR/summary.md and summary.json

Standard library only: the summary is written even when torch or the package does not import.
`write` reads what gpu_check.sh leaves in OUTDIR: steps.tsv (one line per step: name, exit code,
seconds, budget, log file, note), env.json, gpu_tests.xml (pytest's JUnit report), bench/*.json
and finetune-*/finetune.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# `timeout` exits 124 when the budget ran out (137 when the command ignored SIGTERM and was killed).
TIMED_OUT = (124, 137)
NOT_RUN = -1  # gpu_check.sh's exit code for a step it did not start


def gate(env_path: Path, archs: str) -> str | None:
    """Why the CUDA kernels cannot be exercised here (every reason found), or None when they can."""
    try:
        env = json.loads(env_path.read_text())
    except (OSError, ValueError) as exc:
        return f"`qlora_kernels env` gave no report ({type(exc).__name__}: {exc})"
    reasons = []
    if not env.get("cuda_available"):
        reasons.append("torch.cuda.is_available() is False: torch sees no GPU (a CUDA build of torch and a "
                       "driver are needed)")
    if not env.get("native_module"):
        reasons.append(f"the native module _C does not import: {env.get('native_error')}")
    elif not env.get("cuda_kernels_compiled"):
        reasons.append("the native module was built without its CUDA kernels (nvcc was not found, or "
                       "QLORA_KERNELS_CUDA=0)")
    else:
        built = set(env.get("cuda_archs", "").split(","))
        missing = [a for a in archs.split(";") if a and a not in built]
        if missing:
            reasons.append(f"the CUDA kernels were built for {env.get('cuda_archs')!r}, not for this GPU's "
                           f"{','.join(missing)}")
        seen = env.get("cuda_devices_seen_by_kernels")
        if env.get("cuda_available") and (not isinstance(seen, int) or seen < 1):
            reasons.append(f"the CUDA kernels see no device: {seen}")
    return "; ".join(reasons) or None


def _steps(out: Path) -> list[dict]:
    steps = []
    path = out / "steps.tsv"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        name, rc, seconds, budget, log, note = (line.split("\t") + [""] * 6)[:6]
        rc = int(rc)
        status = ("not run" if rc == NOT_RUN else "passed" if rc == 0
                  else "timed out" if rc in TIMED_OUT else "failed")
        steps.append({"step": name, "status": status, "exit_code": None if rc == NOT_RUN else rc,
                      "seconds": float(seconds), "budget_s": int(budget), "log": log, "note": note})
    return steps


def _tests(out: Path) -> dict | None:
    path = out / "gpu_tests.xml"
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:  # a run cut short by its budget leaves no complete report
        return {"error": f"unreadable JUnit report: {exc}"}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed, skip_reasons = [], {}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                failed.append({"test": test_id, "message": (node.get("message") or "").splitlines()[0][:300]
                               if node.get("message") else ""})
        node = case.find("skipped")
        if node is not None:
            reason = node.get("message") or ""
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    counts["failed_tests"] = failed
    counts["skip_reasons"] = skip_reasons
    return counts


def _bench(out: Path) -> dict | None:
    paths = sorted((out / "bench").glob("*.json"))
    if not paths:
        return None
    result = json.loads(paths[-1].read_text())
    by_op: dict[str, list[float]] = {}
    for row in result["rows"]:
        by_op.setdefault(row["op"], []).append(row["ratio"])
    return {
        "file": str(paths[-1].relative_to(out)),
        "device": result.get("device"),
        "read_bandwidth_GBps": result.get("read_bandwidth_GBps"),
        "ratio_by_op": {op: {"cases": len(r), "min": min(r), "median": round(statistics.median(r), 3), "max": max(r)}
                        for op, r in by_op.items()},
        "rows": [{"op": r["op"], "shape": r["shape"], "dtype": r.get("dtype"), "ours_ms": r["ours_ms"],
                  "baseline": r["baseline"], "baseline_ms": r["baseline_ms"], "ratio": r["ratio"],
                  "roofline": r.get("roofline", "")} for r in result["rows"]],
    }


def _finetune(out: Path) -> list[dict]:
    runs = []
    for path in sorted(out.glob("finetune-*/finetune.json")):
        record = json.loads(path.read_text())
        summary = record["summary"]
        runs.append({
            "file": str(path.relative_to(out)),
            "model": f"{record['config']['family']} {record['config']['size']}",
            "device": record["device"].get("name"),
            "memory_measure": record.get("memory_measure"),
            **{side: {k: summary[side][k] for k in ("tokens_per_s", "peak_mb", "first_loss", "final_loss")}
               for side in ("stock", "patched") if side in summary},
            "patched_over_stock": summary.get("patched_over_stock"),
            "final_loss_gap": summary.get("final_loss_gap"),
            "wall_s": record.get("wall_s"),
        })
    return runs


def collect(out: Path) -> dict:
    env_path = out / "env.json"
    refused = out / "refused.txt"
    try:
        env = json.loads(env_path.read_text())
    except (OSError, ValueError):
        env = None
    steps = _steps(out)
    return {
        "ok": bool(steps) and all(s["status"] == "passed" for s in steps) and not refused.exists(),
        "refused": refused.read_text().strip() if refused.exists() else None,
        "gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None,
        "versions": {k: env.get(k) for k in ("qlora_kernels", "python", "torch", "triton", "transformers", "peft",
                                             "bitsandbytes", "cuda_archs", "cuda_runtime_compiled", "device",
                                             "device_capability")} if env else None,
        "steps": steps,
        "total_seconds": round(sum(s["seconds"] for s in steps), 1),
        "gpu_tests": _tests(out),
        "bench": _bench(out),
        "finetune": _finetune(out),
    }


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(s: dict) -> str:
    lines = ["# GPU check", ""]
    lines.append(f"Result: **{'all steps passed' if s['ok'] else 'NOT all steps passed'}**"
                 f" ({s['total_seconds']:.0f} s in all)")
    if s["refused"]:
        lines += ["", f"**Stopped before the GPU steps:** {s['refused']}"]
    if s["gpu"]:
        lines += ["", "GPU: " + s["gpu"].replace("\n", "; ")]
    if s["versions"]:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items())]
    lines += ["", "| step | status | exit code | seconds | budget s | log | note |", "|---|---|---|---|---|---|---|"]
    for st in s["steps"]:
        lines.append(f"| {st['step']} | {st['status']} | {_fmt(st['exit_code'], 'd')} | {st['seconds']:.1f} | "
                     f"{st['budget_s']} | {st['log']} | {st['note']} |")
    t = s["gpu_tests"]
    if t is not None:
        lines += ["", "## pytest -m gpu", ""]
        if "error" in t:
            lines.append(t["error"])
        else:
            lines.append(f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
                         f"({t['tests']} collected)")
            lines += [f"- FAILED {f['test']}: {f['message']}" for f in t["failed_tests"]]
            lines += [f"- skipped {n}x: {reason}" for reason, n in t["skip_reasons"].items()]
    b = s["bench"]
    if b is not None:
        lines += ["", f"## bench all ({b['file']}; read bandwidth {b['read_bandwidth_GBps']} GB/s)", "",
                  "| op | cases | speed-up vs baseline min | median | max |", "|---|---|---|---|---|"]
        for op, r in b["ratio_by_op"].items():
            lines.append(f"| {op} | {r['cases']} | {r['min']:.2f}x | {r['median']:.2f}x | {r['max']:.2f}x |")
    for run in s["finetune"]:
        ratio = run["patched_over_stock"] or {}
        lines += ["", f"## finetune {run['model']} ({run['file']})", "",
                  "| side | tokens/s | peak MB | first loss | final loss |", "|---|---|---|---|---|"]
        for side in ("stock", "patched"):
            if side in run:
                r = run[side]
                lines.append(f"| {side} | {_fmt(r['tokens_per_s'], '.0f')} | {_fmt(r['peak_mb'], '.0f')} | "
                             f"{_fmt(r['first_loss'], '.4f')} | {_fmt(r['final_loss'], '.4f')} |")
        lines.append(f"\npatched / stock: tokens/s {_fmt(ratio.get('tokens_per_s'))}x, "
                     f"peak memory {_fmt(ratio.get('peak_mb'))}x ({run['memory_measure']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "gate":
        reason = gate(Path(argv[1]), argv[2])
        if reason:
            print(reason)
            return 1
        return 0
    if len(argv) == 2 and argv[0] == "write":
        out = Path(argv[1])
        summary = collect(out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(markdown(summary))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
