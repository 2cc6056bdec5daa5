"""`qlora-kernels finetune --parts` and `--vocab`: stock, every part on and every part on but one,
each configuration's tokens/s and peak memory in the table, the JSON and the plot; parts a family
does not have are left out and said so; a larger vocabulary over the same byte data."""

from __future__ import annotations

import json
import math

import pytest

from qlora_kernels.bench.source import source_commit
from qlora_kernels.cli import main
from qlora_kernels.finetune.presets import PARTS, RunConfig, configurations

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("matplotlib")


def _record(out_dir, family):
    (run_dir,) = out_dir.glob(f"finetune-{family}-test-*")
    assert (run_dir / "finetune.png").stat().st_size > 0
    return json.loads((run_dir / "finetune.json").read_text())


def test_configurations_switch_off_one_part_each():
    assert configurations(("stock", "patched"), None) == {"stock": None, "patched": {}}
    assert configurations(("stock", "patched"), ("loss", "mlp")) == {
        "stock": None, "patched": {}, "patched -loss": {"loss": False}, "patched -mlp": {"mlp": False}}
    cfg = RunConfig.resolve("opt", "test", None, None, None, None, 0, "cpu", "both", 1, None, "all")
    assert cfg.parts == ("attention", "lora", "loss") and set(cfg.not_applicable) == {"norm", "rope", "mlp"}
    cfg = RunConfig.resolve("llama", "test", None, None, None, None, 0, "cpu", "both", 1, None, "mlp,loss")
    assert cfg.parts == ("loss", "mlp")  # in PARTS' order
    cfg = RunConfig.resolve("llama", "test", None, None, None, None, 0, "cpu", "both", 1, None, "all")
    assert cfg.parts == PARTS and not cfg.not_applicable and len(cfg.configurations) == 2 + len(PARTS)


def test_finetune_parts_llama(tmp_path, capsys):
    parts = ["attention", "loss", "mlp"]  # bare --parts: all six (test_configurations_switch_off_one_part_each)
    assert main(["finetune", "--size", "test", "--steps", "2", "--seq-len", "16", "--parts", ",".join(parts),
                 "--in-process", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    record = _record(tmp_path, "llama")
    names = ["stock", "patched", *(f"patched -{part}" for part in parts)]
    assert list(record["runs"]) == names and record["config"]["parts"] == parts
    assert record["config"]["configurations"]["patched -loss"] == {"loss": False}
    assert record["source"] == source_commit()
    summary = record["summary"]
    assert set(summary["over_stock"]) == set(names[1:]) and list(summary["part_effect"]) == parts
    for name in names:
        assert summary[name]["tokens_per_s"] > 0
        assert summary[name]["peak_mb"] is None or summary[name]["peak_mb"] > 0
        assert summary[name]["first_loss"] == pytest.approx(summary["stock"]["first_loss"], rel=2e-2)
    for part, effect in summary["part_effect"].items():
        assert effect["tokens_per_s"] == pytest.approx(
            summary["patched"]["tokens_per_s"] / summary[f"patched -{part}"]["tokens_per_s"])
    # every configuration's row, its ratios against stock and the effect of each part, in the table
    for name in names:
        assert f"\n{name} " in printed
    assert "patched -loss/stock" in printed and "effect of a part" in printed
    assert all(f"\n{part} " in printed for part in parts)
    # each patched configuration patched what it says
    for name in names[1:]:
        report = record["runs"][name]["patch"]
        off = name.removeprefix("patched -") if name != "patched" else None
        if off in ("loss", "norm", "rope", "mlp"):
            assert f"{off}=0" in report
        if off == "attention":
            assert "attention=None" in report


def test_finetune_parts_opt_vocab(tmp_path, capsys):
    """OPT has no RMSNorm, rotary embedding or gated MLP: those parts are left out and said so.
    With --vocab the model's head is that large, the data stay bytes."""
    assert main(["finetune", "--model", "opt", "--size", "test", "--steps", "2", "--seq-len", "16", "--parts",
                 "loss,norm", "--vocab", "1000", "--in-process", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    record = _record(tmp_path, "opt")
    assert list(record["runs"]) == ["stock", "patched", "patched -loss"]
    assert list(record["config"]["parts_not_applicable"]) == ["norm"]
    assert "--parts: norm left out" in printed
    assert record["config"]["vocab"] == 1000 and record["config"]["model"]["config"]["vocab_size"] == 1000
    # random init over 1000 ids: the first loss is near log(1000), not log(257)
    assert abs(record["summary"]["stock"]["first_loss"] - math.log(1000)) < 1.0
    assert "opt test vocab 1000, 2 steps" in printed
