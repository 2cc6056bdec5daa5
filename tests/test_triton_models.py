"""The GPU backend's Triton code paths at model level, on the CPU.

`QLORA_KERNELS_TRITON_ON_CPU=1` is read when qlora_kernels is imported, so the model cases
(`triton_models_on_cpu.py`) run in a pytest process of their own, started with it and with
TRITON_INTERPRET=1 (about 2 minutes of CPU: the interpreter is slow, the models tiny). The
switch's checks of its environment run here.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qlora_kernels.backends import triton_on_cpu

TESTS = Path(__file__).resolve().parent


def test_models_run_through_the_triton_kernels_on_cpu(tmp_path):
    report = tmp_path / "report.xml"
    env = dict(os.environ, TRITON_INTERPRET="1", **{triton_on_cpu.SWITCH: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5", f"--junitxml={report}",
         str(TESTS / "triton_models_on_cpu.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-4000:]
    suite = ET.parse(report).getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("skipped")) == 0, proc.stdout[-4000:]


def test_switch_off_unless_set_to_1(monkeypatch):
    monkeypatch.delenv(triton_on_cpu.SWITCH, raising=False)
    assert not triton_on_cpu.requested()
    for off in ("0", ""):
        monkeypatch.setenv(triton_on_cpu.SWITCH, off)
        assert not triton_on_cpu.requested()
    monkeypatch.setenv(triton_on_cpu.SWITCH, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_on_cpu.requested()


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_switch_refuses_other_values(monkeypatch, value):
    monkeypatch.setenv(triton_on_cpu.SWITCH, value)
    with pytest.raises(ValueError, match=f"QLORA_KERNELS_TRITON_ON_CPU='{value}' is not understood; use 1"):
        triton_on_cpu.requested()


@pytest.mark.parametrize("interpret", [None, "0"])
def test_switch_refuses_without_the_interpreter(monkeypatch, interpret):
    monkeypatch.setenv(triton_on_cpu.SWITCH, "1")
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(RuntimeError, match=f"needs TRITON_INTERPRET=1 .*got TRITON_INTERPRET={interpret!r}"):
        triton_on_cpu.requested()
