"""The command line: help, --version, exit codes with one-line messages, where bench writes and
what its results record (bench decode end to end), and -v showing the qlora_kernels log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import qlora_kernels
from qlora_kernels.bench import runner
from qlora_kernels.bench.case import Case
from qlora_kernels.bench.source import source_commit
from qlora_kernels.cli import main
from qlora_kernels.finetune import job


@pytest.mark.parametrize("command", [[], ["finetune"], ["bench"], ["env"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: qlora-kernels" in text
    if command == ["finetune"]:
        assert "--model" in text and "--size" in text and "7b" in text
        assert "--parts" in text and "--vocab" in text
    if command == ["bench"]:
        assert "loss" in text
    if command:
        assert "--verbose" in text and "--log-level" in text


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "qlora_kernels", "--version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout == f"qlora-kernels {qlora_kernels.__version__}\n"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"qlora-kernels {qlora_kernels.__version__}\n"


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    prefix = f"qlora-kernels {command}: error: "
    assert err.startswith(prefix) and err.count("\n") == 1, err  # one line, no traceback
    return err[len(prefix):-1]


@pytest.mark.parametrize("argv, message", [
    (["--size", "test", "--steps", "1"], "steps=1: must be more than the 1 warm-up step(s), which are not timed"),
    (["--size", "test", "--steps", "0"], "steps=0: must be more than the 1 warm-up step(s), which are not timed"),
    (["--seq-len", "1"], "seq_len=1: a sequence needs at least 2 tokens"),
    (["--batch-size", "0"], "batch_size=0: must be at least 1"),
    (["--lr", "0"], "lr=0.0: the learning rate must be positive"),
    (["--device", "gpu0"], "device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
    (["--device", "meta"], "device 'meta': the job runs on cpu or cuda"),
    (["--vocab", "256"], "vocab=256: the byte-level data needs at least 257 ids (256 byte values and the pad id 256)"),
    (["--parts", "loss,lm_head"], "parts='loss,lm_head': name parts among attention, lora, loss, norm, rope, mlp "
                                  "(comma-separated), or all"),
    (["--parts", "--only", "patched"], "--parts trains stock and every configuration of the parts: it cannot run "
                                       "with only='patched'"),
])
def test_finetune_argument_it_cannot_run_with(argv, message, tmp_path, capsys):
    """Exit code 2 and the argument named, before anything is built or written."""
    assert main(["finetune", *argv, "--out", str(tmp_path)]) == 2
    assert one_line_error(capsys, "finetune") == message
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
def test_finetune_on_cuda_without_cuda(tmp_path, capsys):
    assert main(["finetune", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert one_line_error(capsys, "finetune") == "device 'cuda': no CUDA device is available here; use cpu or auto"


@pytest.mark.parametrize("argv", [["finetune", "--size", "70b"], ["finetune", "--model", "gpt2"],
                                  ["finetune", "--steps", "many"], ["bench", "matmul"], ["unknown"]])
def test_argparse_refuses(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


def test_finetune_without_its_dependencies(tmp_path, capsys, monkeypatch):
    real = job.importlib.util.find_spec
    monkeypatch.setattr(job.importlib.util, "find_spec", lambda name: None if name == "peft" else real(name))
    assert main(["finetune", "--size", "test", "--out", str(tmp_path)]) == 1
    assert one_line_error(capsys, "finetune") == "the finetune job needs peft: pip install 'qlora-kernels[hf]'"
    assert not any(tmp_path.iterdir())


def test_bench_markdown_of_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert main(["bench", "--markdown", str(missing)]) == 1
    assert one_line_error(capsys, "bench") == f"No such file or directory: {missing}"


@pytest.fixture
def tiny_bench(monkeypatch):
    """`bench nf4` over one small case, timed by a stub: the runner's own paths (check, table,
    JSON, PNG) in a fraction of a second."""
    pytest.importorskip("matplotlib")
    x = torch.arange(8.0)
    case = {"ok": None}

    def check():
        if not case["ok"]:
            raise AssertionError("ours' output differs from the baseline's by 1 (scale 7)")

    suite = types.SimpleNamespace(cases=lambda device, quick: [Case("nf4_dequantize", [8], "float32", ours=x.clone,
                                                                     baseline=x.clone, baseline_name="torch",
                                                                     check=check)])
    monkeypatch.setitem(runner.SUITES, "nf4", suite)
    monkeypatch.setattr(runner, "median_ms", lambda fn, device, quick: 1.0)
    monkeypatch.setattr(runner, "read_bandwidth_gbps", lambda device, quick: 10.0)
    monkeypatch.setattr(runner, "warm_cpu_allocations", lambda: None)
    monkeypatch.setattr(runner, "default_device", lambda: torch.device("cpu"))
    return case


def test_bench_writes_under_runs_in_the_current_folder(tiny_bench, tmp_path, monkeypatch, capsys):
    tiny_bench["ok"] = True
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "nf4", "--quick"]) == 0
    (path,) = (tmp_path / "runs").glob("bench-*-quick.json")
    assert path.with_suffix(".png").stat().st_size > 0
    assert json.loads(path.read_text())["rows"][0]["op"] == "nf4_dequantize"
    assert f"wrote {path} and {path.with_suffix('.png')}" in capsys.readouterr().out


def test_bench_out(tiny_bench, tmp_path, capsys):
    tiny_bench["ok"] = True
    assert main(["bench", "nf4", "--quick", "--out", str(tmp_path / "results")]) == 0
    (path,) = (tmp_path / "results").glob("bench-*.json")
    assert f"wrote {path}" in capsys.readouterr().out


def test_bench_wrong_result_is_not_timed(tiny_bench, tmp_path, capsys):
    assert main(["bench", "nf4", "--quick", "--out", str(tmp_path)]) == 1
    assert one_line_error(capsys, "bench") == ("nf4_dequantize 8: ours' output differs from the baseline's by 1 "
                                               "(scale 7)")
    assert not any(tmp_path.iterdir())


def test_bench_records_the_commit_it_measured(tiny_bench, tmp_path):
    tiny_bench["ok"] = True
    assert main(["bench", "nf4", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench-*-nf4-*.json")
    head = subprocess.run(["git", "-C", str(Path(qlora_kernels.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert json.loads(path.read_text())["source"] == {"commit": head, "dirty": source_commit()["dirty"]}


def test_bench_decode_quick(tmp_path, monkeypatch, capsys):
    """`bench decode --quick` end to end: the layer rows at 1, 4 and 16 tokens and the generate()
    row, each with its ratio against bf16 and against bitsandbytes, and the commit. Each call is
    timed once (the harness, not the figures, is under test here)."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("bitsandbytes")

    def once(fn, device, quick):
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    monkeypatch.setattr(runner, "median_ms", once)
    monkeypatch.setattr(runner, "read_bandwidth_gbps", lambda device, quick: 10.0)  # 1 GiB read: not under test
    monkeypatch.setattr(runner, "default_device", lambda: torch.device("cpu"))
    assert main(["bench", "decode", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench-*-decode-*-quick.json")
    result = json.loads(path.read_text())
    assert result["source"] == source_commit() and result["read_bandwidth_GBps"] == 10.0
    layers, (generate,) = result["rows"][:-1], result["rows"][-1:]
    assert [(r["op"], r["tokens"]) for r in layers] == [("NF4Linear decode", m) for m in (1, 4, 16)] * 2
    assert {r["baseline"] for r in layers} == {"bf16 nn.Linear"}
    assert generate["op"] == "generate greedy" and generate["baseline"] == "same model in bf16"
    for row, other in [*((r, "bnb_linear4bit") for r in layers), (generate, "bnb_4bit")]:
        assert row["ratio"] == pytest.approx(row["baseline_ms"] / row["ours_ms"], rel=1e-2, abs=1e-3)
        assert list(row["other_baselines"]) == [other]
        assert row[f"ratio_vs_{other}"] == pytest.approx(row[f"{other}_ms"] / row["ours_ms"], rel=1e-2, abs=1e-3)
    tokens_per_s = generate["tokens_per_s"]
    assert tokens_per_s["ours"] == pytest.approx(generate["new_tokens"] / generate["ours_ms"] * 1e3, rel=1e-3)
    assert generate["ratio"] == pytest.approx(tokens_per_s["ours"] / tokens_per_s["baseline"], rel=1e-2)
    out = capsys.readouterr().out
    assert f"x vs {layers[0]['other_baselines']['bnb_linear4bit']}" in out


def test_bench_loss_quick(tmp_path, monkeypatch, capsys):
    """`bench loss --quick` end to end: both rows checked, timed (once each here) and their peak
    memory taken (the fresh processes' own test: test_bench.py); the commit recorded."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(runner, "cpu_peak_mb", lambda setup, stmt: 1.0 if "fused_linear" in stmt else 4.0)

    def once(fn, device, quick):
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    monkeypatch.setattr(runner, "median_ms", once)
    monkeypatch.setattr(runner, "read_bandwidth_gbps", lambda device, quick: 10.0)
    monkeypatch.setattr(runner, "default_device", lambda: torch.device("cpu"))
    assert main(["bench", "loss", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench-*-loss-*-quick.json")
    result = json.loads(path.read_text())
    assert result["source"] == source_commit() and result["quick"]
    rows = result["rows"]
    assert [(r["op"], r["lm_head"]) for r in rows] == [("linear + cross-entropy fwd+bwd", "frozen"),
                                                       ("linear + cross-entropy fwd+bwd, lm_head trainable",
                                                        "trainable")]
    for row in rows:
        assert row["baseline"] == "lm_head + transformers ForCausalLMLoss" and row["suite"] == "loss"
        assert (row["ours_peak_MB"], row["baseline_peak_MB"], row["peak_ratio"]) == (1.0, 4.0, 0.25)
    assert "linear + cross-entropy fwd+bwd" in capsys.readouterr().out


@pytest.fixture
def env_that_logs(monkeypatch):
    """`env` with a report that logs one line at INFO and one at WARNING."""
    import qlora_kernels.env

    def backends():
        logging.getLogger("qlora_kernels.env").info("an INFO line")
        logging.getLogger("qlora_kernels.env").warning("a WARNING line")
        return {}
    monkeypatch.setattr(qlora_kernels.env, "backends", backends)


@pytest.mark.parametrize("flags, shown", [([], ["WARNING"]), (["-v"], ["INFO", "WARNING"]),
                                          (["--log-level", "info"], ["INFO", "WARNING"]),
                                          (["--log-level", "error"], [])])
def test_log_level(env_that_logs, flags, shown, capsys):
    assert main(["env", *flags]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = {"INFO": "INFO qlora_kernels.env: an INFO line", "WARNING": "WARNING qlora_kernels.env: a WARNING line"}
    assert err == [lines[level] for level in shown]


def test_main_leaves_logging_as_it_found_it(env_that_logs, capsys):
    logger = logging.getLogger("qlora_kernels")
    before = (logger.level, list(logger.handlers))
    assert main(["env", "-v"]) == 0
    assert (logger.level, logger.handlers) == before


def test_bench_a_failing_suite_stops_alone(tiny_bench, tmp_path, monkeypatch, capsys):
    """A wrong result stops its suite only: the next suite is measured, printed as it goes and
    written, the failure listed in the JSON and the exit status 1."""
    x = torch.arange(4.0)
    good = types.SimpleNamespace(cases=lambda device, quick: [Case("lora_linear", [4], "float32", ours=x.clone,
                                                                    baseline=x.clone, baseline_name="torch",
                                                                    check=lambda: None)])
    monkeypatch.setattr(runner, "SUITES", {"nf4": runner.SUITES["nf4"], "lora": good})
    assert main(["bench", "all", "--quick", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "nf4: stopped, nf4_dequantize 8: ours' output differs" in out.out
    assert "lora_linear" in out.out
    (path,) = tmp_path.glob("bench-*.json")
    record = json.loads(path.read_text())
    assert [r["op"] for r in record["rows"]] == ["lora_linear"]
    assert record["failed"] == ["nf4_dequantize 8: ours' output differs from the baseline's by 1 (scale 7)"]
