"""The Triton kernels as a GPU compiles them, and the launch options they get.

The static check compiles every kernel for sm_90 and sm_80 without a GPU through
`scripts/triton_static_report.py` (see its docstring for how, and for the specializations),
in a subprocess: conftest sets TRITON_INTERPRET for this process, and `triton.jit` reads it
when a kernel is defined. Its rows give each (target, specialization, kernel, config) the
registers, local memory (spills) and shared memory ptxas settled on.
"""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qlora_kernels.triton import lora  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_static_report.py"


@pytest.fixture(scope="module")
def static_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton_static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(path)], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # the table, for `pytest -s`
    print(proc.stdout)
    return json.loads(path.read_text())


def _describe(rows):
    return "\n".join(f"sm_{r['arch']} {r['case']} {r['kernel']} [{r['config']}]: {r['regs']} registers, "
                     f"{r['local']} B local, {r['shared']} B shared" for r in rows)


def test_every_kernel_is_compiled(static_report):
    assert static_report["rows"]
    assert static_report["kernels_not_compiled"] == [], "add a case that launches them to the script"


def test_every_specialization_has_a_config_that_fits(static_report):
    # the limits are the devices' opt-in maximum per block (sm_90 232,448 B, sm_80 166,912 B)
    groups = defaultdict(list)
    for row in static_report["rows"]:
        groups[row["arch"], row["case"], row["kernel"]].append(row)
    none_fits = [rows for rows in groups.values() if not any(r["fits"] for r in rows)]
    assert not none_fits, _describe(row for rows in none_fits for row in rows)


def test_autotuner_keeps_exactly_the_configs_that_fit(static_report):
    tuned = [r for r in static_report["rows"] if r["kept"] is not None]
    assert tuned
    wrong = [r for r in tuned if r["kept"] != r["fits"]]
    assert not wrong, _describe(wrong)


def test_every_kernel_also_fits_consumer_ampere(static_report):
    # sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4) compile like sm_80 with 101,376 B per block:
    # launches with fixed tiles fit there, and each autotuned specialization keeps a config
    # there, exactly those that fit
    sm80 = [r for r in static_report["rows"] if r["arch"] == 80]
    too_big = [r for r in sm80 if r["kept"] is None and r["shared"] > 101376]
    assert not too_big, _describe(too_big)
    groups = defaultdict(list)
    for row in sm80:
        if row["kept_sm86"] is not None:
            groups[row["case"], row["kernel"]].append(row)
    assert groups
    none_fits = [rows for rows in groups.values() if not any(r["shared"] <= 101376 for r in rows)]
    assert not none_fits, _describe(row for rows in none_fits for row in rows)
    wrong = [r for rows in groups.values() for r in rows if r["kept_sm86"] != (r["shared"] <= 101376)]
    assert not wrong, _describe(wrong)


def test_autotuner_refuses_clearly_when_no_config_fits(static_report):
    # pruned against a device with no shared memory at all: an error that says why, before
    # any launch, instead of Triton's OutOfResources from inside the benchmark
    tuned = [r for r in static_report["rows"] if r["kept"] is not None]
    unclear = [r for r in tuned if "no tile fits the device's 0 bytes of shared memory" not in (r["no_fit_error"] or "")]
    assert not unclear, _describe(unclear)


def test_no_reachable_variant_spills(static_report):
    # reachable: launched as is, or a config the autotuner keeps. bf16/fp16 and fp32 (IEEE and
    # TF32 dots) alike; local memory in a Triton kernel is spilled registers
    reachable = [r for r in static_report["rows"] if r["kept"] is not False]
    spilling = [r for r in reachable if r["local"]]
    assert not spilling, _describe(spilling)


@pytest.fixture
def restore_matmul_precision():
    legacy = torch.get_float32_matmul_precision()
    precision = torch.backends.cuda.matmul.fp32_precision
    yield
    # legacy setter first: it overwrites the per-backend value, which then goes back as found
    torch.set_float32_matmul_precision(legacy)
    torch.backends.cuda.matmul.fp32_precision = precision


@pytest.mark.parametrize(("set_precision", "expected"), [
    (lambda: None, "ieee"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "ieee"),
    (lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    (lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
], ids=("default", "fp32_precision-tf32", "fp32_precision-ieee", "legacy-high", "legacy-highest"))
def test_fp32_dots_follow_torch_matmul_precision(restore_matmul_precision, set_precision, expected):
    set_precision()
    assert lora._launch_flags(torch.ones(1))["DOT_PRECISION"] == expected
    assert lora._launch_flags(torch.ones(1, dtype=torch.bfloat16))["DOT_PRECISION"] is None


def test_fp32_lora_with_tf32_set_through_fp32_precision(restore_matmul_precision):
    # transformers' TrainingArguments(tf32=True) sets TF32 this way; torch's legacy
    # `allow_tf32` then raises when read
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    M, N, K, r = 5, 37, 70, 8
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * K**-0.5
    lora_A, lora_B = torch.randn(r, K, generator=g) * K**-0.5, torch.randn(N, r, generator=g)
    dy = torch.randn(M, N, generator=g)
    x, w, lora_A, lora_B, dy = (t.to(device) for t in (x, w, lora_A, lora_B, dy))
    y, xa = lora.lora_forward_triton(x, w, None, None, lora_A, lora_B, 2.0, 0.0, 1)
    dx, _, _, _ = lora.lora_backward_triton(dy, x, w, None, lora_A, lora_B, 2.0, 0.0, 1, xa, True, True, True, False)
    x64, w64, a64, b64, dy64 = (t.double() for t in (x, w, lora_A, lora_B, dy))
    # TF32 keeps 10 mantissa bits: a relative error of about 2**-11 per product
    assert torch.allclose(y.double(), x64 @ w64.t() + 2.0 * (x64 @ a64.t()) @ b64.t(), rtol=0, atol=1e-2)
    assert torch.allclose(dx.double(), dy64 @ w64 + 2.0 * (dy64 @ b64) @ a64, rtol=0, atol=1e-2)


def test_rms_norm_kernels_compile_for_sm90_and_sm80_without_spills(tmp_path):
    # its cases alone (seconds), so that a failure here names the RMSNorm kernels
    path = tmp_path / "rms_norm.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--case", "rms_norm", "--jobs", "1", "--json", str(path)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = json.loads(path.read_text())["rows"]
    assert {(r["arch"], r["kernel"]) for r in rows} == {
        (arch, kernel) for arch in (90, 80) for kernel in ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel")}
    assert {r["case"] for r in rows} >= {"rms_norm bfloat16 H8192 llama", "rms_norm float32 H8192 gemma"}
    bad = [r for r in rows if r["local"] or not r["fits"]]
    assert not bad, _describe(bad)


def test_cross_entropy_rows_kernel_compiles_for_both_targets_without_spills(static_report):
    # the fused loss's row kernel: gradient pass and softcap, loss only, a small vocabulary
    rows = [r for r in static_report["rows"] if r["kernel"] == "cross_entropy_rows_kernel"]
    assert {(r["arch"], r["case"]) for r in rows} == {
        (arch, case) for arch in (90, 80)
        for case in ("cross-entropy V=32000 grad softcap", "cross-entropy V=32000", "cross-entropy V=100 grad")}
    assert all(r["fits"] and r["local"] == 0 for r in rows), _describe(rows)


def test_swiglu_kernels_compile_for_sm90_and_sm80_without_spills(tmp_path):
    # the SwiGLU cases alone (the whole report is the fixture above): both kernels, every case,
    # both targets, no local memory, no shared memory beyond the device's
    path = tmp_path / "swiglu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--case", "swiglu", "--jobs", "1", "--json", str(path)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = json.loads(path.read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert len(cases) >= 4 and any("packed" in c for c in cases) and any("gelu_tanh" in c for c in cases)
    for case in cases:
        assert {(r["arch"], r["kernel"]) for r in rows if r["case"] == case} == {
            (arch, kernel) for arch in (90, 80) for kernel in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")}, case
    bad = [r for r in rows if r["local"] or not r["fits"]]
    assert not bad, _describe(bad)


def test_rope_kernel_compiles_for_both_targets_without_spills(static_report):
    # forward and backward, full and partial rotary, bf16 / fp16 / fp32 (fp32 tables with bf16 q)
    rows = [r for r in static_report["rows"] if r["kernel"] == "_rope_kernel"]
    assert {r["arch"] for r in rows} == {90, 80}
    assert {r["case"] for r in rows} >= {"bfloat16 rope D128 rotary128", "bfloat16 rope D96 rotary32",
                                         "float32 rope D64 rotary64", "float16 rope D256 rotary256"}
    bad = [r for r in rows if not r["fits"] or r["local"]]
    assert not bad, _describe(bad)
