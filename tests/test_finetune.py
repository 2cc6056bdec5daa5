"""The finetune job (`make demo`): tiny runs of each family, stock vs patched, and how it fails."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_kernels.cli import main
from qlora_kernels.errors import JobFailed
from qlora_kernels.finetune import make_batches
from qlora_kernels.finetune import train as finetune_train
from qlora_kernels.finetune import job
from qlora_kernels.finetune.recipe import stock_attention
from qlora_kernels.finetune.train import FIRST_LOSS_RTOL

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("matplotlib")


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
    assert main(["finetune", "--model", family, "--size", "test", "--steps", "3", "--seq-len", "16", "--out",
                 str(tmp_path), "--in-process"]) == 0
    record = _check_run(tmp_path, family, capsys.readouterr().out)
    assert record["runs"]["stock"]["attention"] == ("eager" if family == "bloom" else "sdpa")


def test_finetune_isolated_processes(tmp_path, capsys):
    """The default (`make demo`) path: each side in a fresh process (one side here, to stay
    quick); with -v the side process's log reaches this process's stderr."""
    assert main(["finetune", "-v", "--size", "test", "--steps", "2", "--seq-len", "16", "--only", "patched",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    record = _check_run(tmp_path, "llama", printed.out, both=False)
    assert record["config"]["isolated_processes"]
    peak = record["runs"]["patched"]["peak_mb"]
    assert peak is None or peak > 0
    assert "INFO qlora_kernels.patching.model: llama: 2 attention layers -> flash_attention" in printed.err
    assert "INFO qlora_kernels.patching.model: ops on cpu: " in printed.err


def test_finetune_fails_loudly_when_sides_disagree(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune_train, "FIRST_LOSS_RTOL", -1.0)  # any difference, even 0, is too much
    code = main(["finetune", "--size", "test", "--steps", "2", "--seq-len", "16", "--out", str(tmp_path),
                 "--in-process"])
    err = capsys.readouterr().err  # the progress bars' lines (carriage returns), then the message
    assert code == 1 and "Traceback" not in err
    assert err.split("\r")[-1].split("\n")[-2].startswith(
        "qlora-kernels finetune: error: patched model disagrees with stock on the first batch")
    (run_dir,) = tmp_path.glob("finetune-llama-test-*")
    assert not (run_dir / "init-bf16").exists() and not (run_dir / "finetune.json").exists()


def _side_spec(tmp_path, **change) -> dict:
    spec = {"family": "llama", "size": "test", "steps": 2, "seq_len": 16, "batch_size": 1, "lr": 1e-3, "seed": 0,
            "device": "cpu", "checkpoint": str(tmp_path / "init-bf16"), "batches": str(tmp_path / "batches.pt"),
            "stock_attention": stock_attention("llama"), "expect_first_loss": None}
    return dict(spec, **change)


def test_side_process_reports_job_failed(tmp_path, monkeypatch):
    """In a side's process, a JobFailed becomes a message in the result file, with the log
    records of the qlora_kernels logger at the level the parent asked for."""
    def train_side(spec, side, batches, expect_first_loss):
        logging.getLogger("qlora_kernels.patching.model").info("an INFO line")
        logging.getLogger("qlora_kernels.patching.model").debug("a DEBUG line")
        raise JobFailed("patched: loss is nan at step 0")

    torch.save(torch.zeros(2, 1, 16, dtype=torch.uint8), tmp_path / "batches.pt")
    (tmp_path / "spec.json").write_text(json.dumps(_side_spec(tmp_path, log_level=logging.INFO)))
    monkeypatch.setattr(job, "train_side", train_side)
    monkeypatch.setattr(sys, "argv", ["-c", str(tmp_path / "spec.json"), "patched", str(tmp_path / "result.json")])
    # the worker configures the logger of the process it owns: here that is pytest's, so undo it after
    logger = logging.getLogger("qlora_kernels")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "level", logger.level)
    job._worker()
    assert json.loads((tmp_path / "result.json").read_text()) == {
        "error": "patched: loss is nan at step 0",
        "log": [{"name": "qlora_kernels.patching.model", "level": logging.INFO, "message": "an INFO line"}]}


def test_side_failure_is_raised_here_after_its_log(tmp_path, monkeypatch, caplog):
    """The parent re-logs the side's records and raises the side's JobFailed: one message."""
    def side_process(argv):
        Path(argv[-1]).write_text(json.dumps({"error": "patched: loss is nan at step 0", "log": [
            {"name": "qlora_kernels.patching.model", "level": logging.INFO, "message": "an INFO line"}]}))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(job.subprocess, "run", side_process)
    caplog.set_level(logging.INFO, logger="qlora_kernels")
    with pytest.raises(JobFailed, match=r"^patched: loss is nan at step 0$"):
        job._run_isolated(_side_spec(tmp_path), "patched", tmp_path)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("qlora_kernels.patching.model", "an INFO line")]
    assert not list(tmp_path.iterdir())  # spec and result files removed


def test_side_process_crash_names_the_side(tmp_path):
    with pytest.raises(JobFailed, match=r"the stock side's process failed \(exit code 1; its output is above\)"):
        job._run_isolated(_side_spec(tmp_path), "stock", tmp_path)  # no batches file: the process dies at load
