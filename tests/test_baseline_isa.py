"""QLORA_KERNELS_CPU_ISA: the CPU kernels on their baseline code paths.

A CPU with AVX2 never takes the portable paths by itself (the scalar NF4 quantize and lookup, the
attention tile steps without AVX2 + FMA); with QLORA_KERNELS_CPU_ISA=baseline every CPU kernel
does. The variable is read once, when _C loads, so these checks run in fresh processes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_kernels._native import native
from qlora_kernels.backends.attention_cpu import flash_attention_fwd_cpu

pytestmark = pytest.mark.skipif(native() is None, reason="native module not built")

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = "QLORA_KERNELS_CPU_ISA"


def _widest_isa() -> str:
    """The level _C picks by itself on this CPU, from /proc/cpuinfo."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "baseline"
    with open("/proc/cpuinfo") as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "ssse3" if "ssse3" in flags else "baseline"


def _python(code: str, setting: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{VARIABLE: setting})
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_reported_isa_follows_the_variable():
    """build_info["cpu_isa"] is the level the kernels run: baseline when asked, else the widest
    this CPU supports. Also run under QLORA_KERNELS_CPU_ISA=baseline by the test below."""
    want = "baseline" if os.environ.get(VARIABLE) == "baseline" else _widest_isa()
    assert native().build_info["cpu_isa"] == want


@pytest.mark.parametrize("setting, isa", [("auto", _widest_isa()), ("", _widest_isa()), ("baseline", "baseline")])
def test_each_setting_gives_its_isa(setting, isa):
    proc = _python("import qlora_kernels._C as C; print(C.build_info['cpu_isa'])", setting)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [isa]


@pytest.mark.parametrize("setting", ["avx512", "Baseline", "sse2"])
def test_an_unknown_setting_fails_the_import(setting):
    proc = _python("import qlora_kernels._C", setting)
    assert proc.returncode != 0
    assert f"{VARIABLE} must be 'auto' (the widest instruction set this CPU supports) or 'baseline'" in proc.stderr
    assert f"got '{setting}'" in proc.stderr


def test_cpu_kernel_checks_pass_on_the_baseline_isa():
    """Every CPU check of the NF4 and attention kernel tests (bit for bit against the reference for
    NF4, within the tolerances for attention), rerun with QLORA_KERNELS_CPU_ISA=baseline."""
    env = dict(os.environ, **{VARIABLE: "baseline"})
    checks = ["tests/test_nf4_kernels.py", "tests/test_attention_cpu.py",
              "tests/test_baseline_isa.py::test_reported_isa_follows_the_variable"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *checks], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = proc.stdout[-3000:]
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    assert "PASSED tests/test_baseline_isa.py::test_reported_isa_follows_the_variable" in proc.stdout, summary
    passed = sum(line.startswith("PASSED tests/test_nf4_kernels.py::test_cpu_kernels_match_reference")
                 for line in proc.stdout.splitlines())
    assert passed >= 200, summary  # the bit-exact quantize / dequantize checks ran, not skipped


_ATTENTION = """
import sys
import torch
from qlora_kernels.backends.attention_cpu import flash_attention_fwd_cpu
q, k, v, alibi = torch.load(sys.argv[1])
torch.save(flash_attention_fwd_cpu(q, k, v, causal=True, softcap=3.0, alibi_slopes=alibi)[0], sys.argv[2])
"""


@pytest.mark.skipif(native() is None or native().build_info["cpu_isa"] != "avx2",
                    reason="this process runs the attention steps without AVX2 + FMA already")
def test_baseline_attention_steps_round_differently(tmp_path):
    """The kernels follow the variable, not only the report: the AVX2 steps fuse multiply-adds (one
    rounding) where the baseline steps round twice, so the outputs differ in their last bits."""
    q, k, v = (torch.randn(1, 2, 90, 64) for _ in range(3))
    alibi = torch.tensor([0.25, 0.0625])
    torch.save((q, k, v, alibi), tmp_path / "inputs.pt")
    env = dict(os.environ, **{VARIABLE: "baseline"})
    proc = subprocess.run([sys.executable, "-c", _ATTENTION, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    baseline = torch.load(tmp_path / "out.pt")
    widest = flash_attention_fwd_cpu(q, k, v, causal=True, softcap=3.0, alibi_slopes=alibi)[0]
    assert not torch.equal(baseline, widest)
    torch.testing.assert_close(baseline, widest, rtol=1e-5, atol=1e-5)


def test_an_unknown_setting_fails_the_package_import_instead_of_falling_back():
    """A bad setting is the user's to fix: `import qlora_kernels` raises it rather than warning that
    _C is not built and running the slow reference."""
    proc = _python("import qlora_kernels", "avx512")
    assert proc.returncode != 0
    assert f"{VARIABLE} must be 'auto'" in proc.stderr and "not built" not in proc.stderr


def test_backends_reports_the_isa():
    import qlora_kernels as qk

    assert qk.backends()["cpu_isa"] == native().build_info["cpu_isa"]
