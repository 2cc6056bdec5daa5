"""scripts/gpu_check.sh on a machine without a GPU: its control flow with stand-ins for the
programs of a CUDA machine (nvidia-smi, pip, the package's commands, pytest), and its summary writer."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

_spec = importlib.util.spec_from_file_location("gpu_summary", SCRIPTS / "gpu_summary.py")
gpu_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_summary)

CUDA_ENV = {"native_module": True, "native_error": None, "cuda_kernels_compiled": True, "cuda_archs": "90a",
            "cuda_available": True, "cuda_devices_seen_by_kernels": 1, "torch": "2.11.0", "device": "NVIDIA H200"}

# Stands in for `python3`: the package's commands, pip and pytest do what FAKE_* asks; the summary
# writer runs for real.
FAKE_PYTHON = r'''
import json, os, signal, sys, time
from pathlib import Path

signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the caller ignores SIGINT

args = sys.argv[1:]
def opt(name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return args[args.index(name) + 1]

if args[:2] == ["-m", "pip"] and "-e" in args:
    Path(os.environ["FAKE_DIR"], "archs").write_text(os.environ.get("QLORA_KERNELS_CUDA_ARCHS", ""))
    sys.exit(int(os.environ.get("FAKE_BUILD_RC", "0")))
if args[:3] == ["-m", "qlora_kernels", "env"]:
    print(os.environ["FAKE_ENV"])
    sys.exit(0)
if args[:2] == ["-m", "pytest"]:
    rc = 1
    try:
        time.sleep(float(os.environ.get("FAKE_TESTS_SLEEP", "0")))
    except KeyboardInterrupt:  # as pytest does: the report of what ran is still written
        rc = 2
    Path(opt("--junitxml")).write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="AssertionError: 2 != 3"/></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped message="needs two GPUs"/></testcase>'
        '</testsuite></testsuites>')
    sys.exit(rc)
if args[:3] == ["-m", "qlora_kernels", "bench"]:
    time.sleep(float(os.environ.get("FAKE_BENCH_SLEEP", "0")))
    out = Path(opt("--out")); out.mkdir(parents=True)
    rows = [{"op": "nf4_dequantize", "shape": [4096, 4096], "dtype": "bfloat16", "ours_ms": 0.1, "baseline": "bnb",
             "baseline_ms": 0.2, "ratio": 2.0}, {"op": "nf4_dequantize", "shape": [64, 64], "dtype": "bfloat16",
             "ours_ms": 0.1, "baseline": "bnb", "baseline_ms": 0.1, "ratio": 1.0}]
    (out / "h200-20260101.json").write_text(json.dumps({"device": "NVIDIA H200", "read_bandwidth_GBps": 4200.0,
                                                        "rows": rows}))
    sys.exit(0)
if args[:3] == ["-m", "qlora_kernels", "finetune"]:
    run = Path(opt("--out")) / "finetune-llama-1b-20260101-000000"; run.mkdir(parents=True)
    side = {"tokens_per_s": 9000.0, "peak_mb": 5000.0, "first_loss": 5.6, "final_loss": 4.0}
    (run / "finetune.json").write_text(json.dumps({
        "config": {"family": "llama", "size": "1b"}, "device": {"name": "NVIDIA H200"},
        "memory_measure": "torch.cuda.max_memory_allocated", "wall_s": 100.0,
        "summary": {"stock": side, "patched": dict(side, tokens_per_s=18000.0),
                    "patched_over_stock": {"tokens_per_s": 2.0, "peak_mb": 1.0}, "final_loss_gap": 0.0}}))
    sys.exit(0)
sys.exit(0)  # pip installing .whl/, `-c ...`: the bitsandbytes import check
'''


def run_check(tmp_path: Path, env_report: dict, summary: bool = True,
              **extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB, 570.86.15, 9.0'\n")
    (tmp_path / "fake_python.py").write_text(FAKE_PYTHON)
    fake = (f'#!/bin/sh\nif [ "$1" = scripts/gpu_summary.py ]; then exec {sys.executable} "$@"; fi\n'
            f'exec {sys.executable} {tmp_path / "fake_python.py"} "$@"\n')
    for name in ("python", "python3"):  # python3 too: the script must build nothing, whatever it calls
        (bin_dir / name).write_text(fake)
    for name in ("nvidia-smi", "python", "python3"):
        (bin_dir / name).chmod(0o755)
    # a copy of the scripts in an empty folder: the check runs there, never in this checkout
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_summary.py"):
        shutil.copy(SCRIPTS / name, repo / "scripts" / name)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "FAKE_DIR": str(tmp_path), "FAKE_ENV": json.dumps(env_report), **extra}
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    if not summary:
        return proc, None
    record = json.loads((out / "summary.json").read_text())
    assert (out / "summary.md").exists()
    return proc, record


def statuses(summary: dict) -> dict:
    return {s["step"]: s["status"] for s in summary["steps"]}


def test_refuses_without_cuda_kernels_and_still_writes_the_summary(tmp_path):
    proc, summary = run_check(tmp_path, dict(CUDA_ENV, cuda_kernels_compiled=False, cuda_archs=""))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "without its CUDA kernels" in summary["refused"]
    assert statuses(summary) == {"gpu": "passed", "wheels": "passed", "build": "passed", "env": "passed",
                                 "gpu_tests": "not run", "bench": "not run", "finetune": "not run"}
    assert not summary["ok"]
    assert (tmp_path / "archs").read_text() == "90a"  # compute capability 9.0 -> this arch only


def test_every_step_runs_after_failures_and_timeouts(tmp_path):
    proc, summary = run_check(tmp_path, CUDA_ENV, FAKE_BUILD_RC="1", FAKE_TESTS_SLEEP="60",
                              QLORA_KERNELS_CHECK_BUDGET_GPU_TESTS="5")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert summary["refused"] is None
    assert statuses(summary) == {"gpu": "passed", "wheels": "passed", "build": "failed", "env": "passed",
                                 "gpu_tests": "timed out", "bench": "passed", "finetune": "passed"}
    gpu_tests = next(s for s in summary["steps"] if s["step"] == "gpu_tests")
    assert gpu_tests["exit_code"] == 124 and gpu_tests["seconds"] < 15
    # interrupted, not killed: the report of the tests that ran is there
    tests = summary["gpu_tests"]
    assert (tests["passed"], tests["failures"], tests["skipped"]) == (1, 1, 1)
    assert tests["failed_tests"] == [{"test": "tests.test_a::test_bad", "message": "AssertionError: 2 != 3"}]
    assert summary["bench"]["ratio_by_op"]["nf4_dequantize"]["cases"] == 2
    (run,) = summary["finetune"]
    assert run["patched"]["tokens_per_s"] == 18000.0 and run["patched_over_stock"]["tokens_per_s"] == 2.0


def test_steps_past_the_deadline_are_not_run(tmp_path):
    proc, summary = run_check(tmp_path, CUDA_ENV, FAKE_BENCH_SLEEP="60", QLORA_KERNELS_CHECK_DEADLINE="8")
    assert proc.returncode == 1
    st = statuses(summary)
    assert st["bench"] == "timed out" and st["finetune"] == "not run"
    assert summary["bench"] is None  # cut short: no JSON
    assert summary["total_seconds"] <= 10


def test_summary_figures_from_bench_json(tmp_path):
    proc, summary = run_check(tmp_path, CUDA_ENV)
    assert proc.returncode == 1  # the stand-in pytest reports a failure
    assert statuses(summary)["bench"] == "passed"
    ratios = summary["bench"]["ratio_by_op"]["nf4_dequantize"]
    assert ratios == {"cases": 2, "min": 1.0, "median": 1.5, "max": 2.0}
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| nf4_dequantize | 2 | 1.00x | 1.50x | 2.00x |" in md


@pytest.mark.parametrize("change, reason", [
    ({"cuda_available": False, "cuda_devices_seen_by_kernels": "none (no CUDA-capable device is detected)"},
     "torch sees no GPU"),
    ({"native_module": False, "native_error": "ImportError: x"}, "does not import: ImportError: x"),
    ({"cuda_kernels_compiled": False}, "without its CUDA kernels"),
    ({"cuda_archs": "80"}, "not for this GPU's 90a"),
    ({"cuda_devices_seen_by_kernels": "none (CUDA driver version is insufficient)"}, "see no device"),
])
def test_gate_names_what_is_missing(tmp_path, change, reason):
    path = tmp_path / "env.json"
    path.write_text(json.dumps(dict(CUDA_ENV, **change)))
    assert reason in gpu_summary.gate(path, "90a")


def test_gate_names_every_missing_part(tmp_path):
    path = tmp_path / "env.json"
    path.write_text(json.dumps(dict(CUDA_ENV, cuda_available=False, cuda_kernels_compiled=False)))
    reason = gpu_summary.gate(path, "90a")
    assert "torch sees no GPU" in reason and "without its CUDA kernels" in reason


def test_gate_passes_with_cuda_kernels_for_this_gpu(tmp_path):
    path = tmp_path / "env.json"
    path.write_text(json.dumps(CUDA_ENV))
    assert gpu_summary.gate(path, "90a") is None
    assert "no report" in gpu_summary.gate(tmp_path / "missing.json", "90a")


def test_only_the_chosen_gpu_steps_run(tmp_path):
    """A check split over two calls: the second runs the bench and the main job only, and its
    summary holds the steps it ran."""
    proc, summary = run_check(tmp_path, CUDA_ENV, QLORA_KERNELS_CHECK_STEPS="bench,finetune")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert statuses(summary) == {"gpu": "passed", "wheels": "passed", "build": "passed", "env": "passed",
                                 "bench": "passed", "finetune": "passed"}
    assert summary["ok"] and summary["gpu_tests"] is None


def test_an_unknown_step_is_refused_before_anything_runs(tmp_path):
    proc, _ = run_check(tmp_path, CUDA_ENV, summary=False, QLORA_KERNELS_CHECK_STEPS="gpu_tests,benhc")
    assert proc.returncode == 2
    assert "unknown step 'benhc'" in proc.stderr
    assert not (tmp_path / "archs").exists()  # nothing was built
