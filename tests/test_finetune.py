"""The finetune job (`make demo`) and the command line: tiny runs of each family, stock vs patched."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from qlora_kernels.cli import main
from qlora_kernels.finetune import FIRST_LOSS_RTOL, make_batches

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("matplotlib")


@pytest.mark.parametrize("command", [[], ["finetune"], ["bench"], ["env"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: qlora-kernels" in text
    if command == ["finetune"]:
        assert "--model" in text and "--size" in text and "7b" in text


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "qlora_kernels", "--help"], capture_output=True, text=True, check=True)
    assert "{finetune,bench,env}" in out.stdout  # the old demo subcommand is gone


def test_batches_are_deterministic():
    a, info = make_batches(steps=3, batch_size=2, seq_len=16, seed=0)
    b, _ = make_batches(steps=3, batch_size=2, seq_len=16, seed=0)
    c, _ = make_batches(steps=3, batch_size=2, seq_len=16, seed=1)
    assert a.shape == (3, 2, 16) and int(a.max()) < 256
    assert a.equal(b) and not a.equal(c) and info["files"] >= 1


def _check_run(out_dir, family, printed, both=True):
    (run_dir,) = out_dir.glob(f"finetune-{family}-test-*")
    assert (run_dir / "finetune.png").stat().st_size > 0
    assert not (run_dir / "init-bf16").exists()
    record = json.loads((run_dir / "finetune.json").read_text())
    assert record["config"]["family"] == family
    assert record["device"]["name"] and record["versions"]["torch"]
    runs = record["runs"]
    assert set(runs) == ({"stock", "patched"} if both else {"patched"})
    for side, r in runs.items():
        assert len(r["losses"]) == len(r["step_s"]) == record["config"]["steps"]
        assert all(math.isfinite(x) for x in r["losses"])
    if both:
        assert runs["patched"]["patch"]
        summary = record["summary"]
        assert summary["first_loss_rel_diff"] <= FIRST_LOSS_RTOL
        assert summary["same_lora_init"]
        assert summary["patched_over_stock"]["tokens_per_s"] > 0
        assert "patched/stock" in printed and "tokens/s" in printed
    return record


@pytest.mark.parametrize("family", ["llama", "opt", "bloom"])
def test_finetune_in_process(family, tmp_path, capsys):
    main(["finetune", "--model", family, "--size", "test", "--steps", "3", "--seq-len", "16", "--out", str(tmp_path),
          "--in-process"])
    record = _check_run(tmp_path, family, capsys.readouterr().out)
    assert record["runs"]["stock"]["attention"] == ("eager" if family == "bloom" else "sdpa")


def test_finetune_isolated_processes(tmp_path, capsys):
    """The default (`make demo`) path: each side in a fresh process (one side here, to stay quick)."""
    main(["finetune", "--size", "test", "--steps", "2", "--seq-len", "16", "--only", "patched", "--out", str(tmp_path)])
    record = _check_run(tmp_path, "llama", capsys.readouterr().out, both=False)
    assert record["config"]["isolated_processes"]
    peak = record["runs"]["patched"]["peak_mb"]
    assert peak is None or peak > 0


def test_finetune_fails_loudly_when_sides_disagree(tmp_path, monkeypatch):
    import qlora_kernels.finetune as finetune

    monkeypatch.setattr(finetune, "FIRST_LOSS_RTOL", -1.0)  # any difference, even 0, is too much
    with pytest.raises(SystemExit, match="disagrees with stock on the first batch"):
        main(["finetune", "--size", "test", "--steps", "2", "--seq-len", "16", "--out", str(tmp_path), "--in-process"])
    (run_dir,) = tmp_path.glob("finetune-llama-test-*")
    assert not (run_dir / "init-bf16").exists() and not (run_dir / "finetune.json").exists()
