"""QLORA_KERNELS_CPU_ISA: the CPU kernels on each of their code paths.

A CPU with AVX-512 never takes the narrower paths by itself (the AVX2 or portable GEMV, the scalar
NF4 quantize and lookup, the attention tile steps without AVX2 + FMA); QLORA_KERNELS_CPU_ISA names
the level every CPU kernel runs on instead. The variable is read once, when _C loads, so these
checks run in fresh processes.
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
LEVELS = ("baseline", "ssse3", "avx2", "avx512", "avx512bf16")  # each includes the ones before it


def _widest_isa() -> str:
    """The level _C picks by itself on this CPU, from /proc/cpuinfo."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "baseline"
    with open("/proc/cpuinfo") as f:
        flags = set(next((line.split() for line in f if line.startswith("flags")), []))
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512bf16" if "avx512_bf16" in flags else "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "ssse3" if "ssse3" in flags else "baseline"


def _supported(level: str) -> bool:
    return LEVELS.index(level) <= LEVELS.index(_widest_isa())


def _python(code: str, setting: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{VARIABLE: setting})
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_reported_isa_follows_the_variable():
    """build_info["cpu_isa"] is the level the kernels run: the one asked for, else the widest this
    CPU supports. Also run under QLORA_KERNELS_CPU_ISA=baseline by the test below."""
    setting = os.environ.get(VARIABLE, "")
    want = _widest_isa() if setting in ("", "auto") else setting
    assert native().build_info["cpu_isa"] == want


@pytest.mark.parametrize("setting", ("auto", "") + LEVELS)
def test_each_setting_gives_its_isa_or_is_refused(setting):
    """A level the CPU has is the level the kernels run; one it lacks fails the import, naming the
    widest it has (never a silent fallback to a narrower path)."""
    proc = _python("import qlora_kernels._C as C; print(C.build_info['cpu_isa'])", setting)
    if setting in ("auto", ""):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [_widest_isa()]
    elif _supported(setting):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [setting]
    else:
        assert proc.returncode != 0
        assert f"{VARIABLE}='{setting}' asks for an instruction set this CPU lacks; it supports up to " \
               f"'{_widest_isa()}'" in proc.stderr


@pytest.mark.parametrize("setting", ["AVX2", "Baseline", "sse2", "avx512f"])
def test_an_unknown_setting_fails_the_import(setting):
    proc = _python("import qlora_kernels._C", setting)
    assert proc.returncode != 0
    assert f"{VARIABLE} must be 'auto' (the widest instruction set this CPU supports), 'baseline'" in proc.stderr
    assert f"got '{setting}'" in proc.stderr


# A cut of tests/test_lora_gemv_cpu.py (its own test functions) for one level: weights bit for bit,
# outputs within the 2x rule, on the layouts each kernel treats apart (odd K, rows starting inside a
# block or a byte, K tiles, blocksizes 64 to 4096), 1 to 16 rows of x (AVX512-BF16 takes up to 8).
_GEMV_CHECKS = """
import sys
import torch
sys.path.insert(0, "tests")
import test_lora_gemv_cpu as t
cases = 0
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for double_quant in (False, True):
        for shape, blocksize in (((37, 301), 64), ((300, 33), 128)):
            t.test_weights_are_those_of_the_reference_bit_for_bit(shape, blocksize, double_quant, dtype)
            cases += 1
    for M in (1, 5, 16):
        t.test_as_accurate_as_plain_torch(M, 16, True, dtype)
        cases += 1
for blocksize in (256, 4096):
    t.test_every_blocksize_and_layout(blocksize, True, (17, 1000))
    cases += 1
t.test_nan_absmax_propagates_to_its_rows_only(True)
print(cases)
"""


@pytest.mark.parametrize("level", [level for level in LEVELS if _supported(level) and level != "ssse3"])
def test_gemv_on_every_level(level):
    """The decode GEMV on each code path this CPU can run (portable, AVX2 + FMA, AVX-512,
    AVX512-BF16; SSSE3 runs the portable one), each in a process of its own."""
    proc = _python(_GEMV_CHECKS, level)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "23"


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


@pytest.mark.skipif(native() is None or native().build_info["cpu_isa"] in ("baseline", "ssse3"),
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
    proc = _python("import qlora_kernels", "avx1024")
    assert proc.returncode != 0
    assert f"{VARIABLE} must be 'auto'" in proc.stderr and "not built" not in proc.stderr


def test_backends_reports_the_isa():
    import qlora_kernels as qk

    assert qk.backends()["cpu_isa"] == native().build_info["cpu_isa"]
