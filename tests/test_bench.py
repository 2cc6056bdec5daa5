"""The benchmark harness: the attention baseline is the faster of SDPA's two GQA forms, ALiBi's
bias is built outside the timed call, no roofline claims more than 100% of the read ceiling it
measured, other baselines get ratios of their own, generate() is compared on the same NF4 bytes
and equal token counts, and results name the git commit of the measured source."""

from __future__ import annotations

import copy
import re
import subprocess
import types

import pytest
import torch

from qlora_kernels.bench import attention, decode, nf4, runner
from qlora_kernels.bench.case import Case, bandwidth
from qlora_kernels.bench.source import source_commit
from qlora_kernels.errors import JobFailed

CPU = torch.device("cpu")


def stub_times(monkeypatch, times: dict) -> None:
    """median_ms answers from `times` (callable -> ms) instead of timing."""
    monkeypatch.setattr(runner, "median_ms", lambda fn, device, quick: times[fn])


@pytest.mark.parametrize("repeat_ms, native_ms", [(2.0, 1.0), (1.0, 2.0)])
def test_the_attention_baseline_is_the_faster_sdpa_form(monkeypatch, repeat_ms, native_ms):
    case = attention._decode_case(CPU, cache=64, heads_q=4, heads_kv=2, head_dim=16)
    ((native_name, native),) = case.baseline_variants.items()
    assert case.baseline_name == "SDPA (GQA by repeat)" and native_name == "SDPA (enable_gqa=True)"
    stub_times(monkeypatch, {case.ours: 0.5, case.baseline: repeat_ms, native: native_ms})
    row = runner.measure(case, CPU, True, 10.0)
    assert row["baseline"] == (native_name if native_ms < repeat_ms else case.baseline_name)
    assert (row["baseline_ms"], row["ratio"]) == (1.0, 2.0)
    assert row["baseline_variants_ms"] == {case.baseline_name: repeat_ms, native_name: native_ms}


def test_both_sdpa_forms_are_checked_in_a_training_step():
    case = attention._causal(CPU, batch=1, heads_q=4, heads_kv=2, seq=32, head_dim=16, backward=True)
    assert list(case.baseline_variants) == ["SDPA (is_causal, enable_gqa=True)"]
    case.check()  # outputs and gradients of ours against each form


def test_the_alibi_baseline_builds_its_bias_outside_the_timed_call(monkeypatch):
    case = attention._alibi(CPU, quick=True)
    real = torch.Tensor.masked_fill
    calls = []
    monkeypatch.setattr(torch.Tensor, "masked_fill", lambda self, *args: calls.append(args) or real(self, *args))
    case.baseline()
    assert calls == []


def test_bandwidth_share_of_the_read_ceiling():
    assert bandwidth(10**9, 100.0, 20.0) == {"ours_GBps": 10.0, "pct_of_read_bandwidth": 50.0,
                                              "roofline": "10.0 GB/s, 50% of read bandwidth"}
    above = bandwidth(10**9, 1.0, 20.0)  # 1000 GB/s against a 20 GB/s ceiling: the bytes were cached
    assert above["pct_of_read_bandwidth"] is None and "%" not in above["roofline"]


def _shares(row: dict) -> list[float]:
    return [float(p) for p in re.findall(r"([\d.]+)%", row["roofline"])] + [row.get("pct_of_read_bandwidth") or 0]


@pytest.mark.parametrize("ms", [1e-6, 1e6])
def test_no_row_claims_more_than_100_percent_of_the_ceiling(monkeypatch, ms):
    """Fake timings, absurdly fast and slow: every share a row states stays within 100%."""
    monkeypatch.setattr(runner, "median_ms", lambda fn, device, quick: ms)
    cases = [*decode.cases(CPU, quick=True), attention._decode_case(CPU, 64, 4, 2, 16)]
    rows = [runner.measure(case, CPU, True, 10.0) for case in cases]
    figures = [nf4._read_mostly(10**9)({"ours": ms}, 10.0), nf4._write_mostly(10**9)({"ours": ms}, 10.0)]
    shares = [share for r in rows + figures for share in _shares(r)]
    assert shares and all(0 <= share <= 100 for share in shares)
    if ms > 1:
        assert all(r["pct_of_read_bandwidth"] is not None for r in rows)


def test_dequantize_into_out_is_checked_and_compared_with_copying_its_bytes(monkeypatch):
    import bitsandbytes.functional as bnb

    from qlora_kernels import nf4_quantize

    w = torch.randn(64, 128, dtype=torch.bfloat16)
    packed, state = nf4_quantize(w, 64, True, torch.bfloat16)
    b_packed, b_state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                          quant_storage=torch.bfloat16)
    case = nf4._into_out(packed, state, b_packed, b_state, "tiny", (64, 128))
    case.check()
    stub_times(monkeypatch, {case.ours: 1.3, case.baseline: 1.0})
    row = runner.measure(case, CPU, True, 10.0)
    assert (row["time_vs_copy"], row["ratio"]) == (1.3, 0.769)
    assert row["roofline"] == "1.30x the time of copying the output bytes"


def test_other_baselines_are_timed_and_get_ratios(monkeypatch):
    ours, dense, bnb = (lambda: torch.ones(4)), (lambda: torch.ones(4)), (lambda: torch.ones(4))
    case = Case("op", [4], "float32", ours=ours, baseline=dense, baseline_name="dense", check=lambda: None,
                also={"bnb": bnb}, other_baselines={"bnb": "bitsandbytes"})
    assert case.sides == {"ours": ours, "baseline": dense, "bnb": bnb}
    stub_times(monkeypatch, {ours: 1.0, dense: 3.0, bnb: 12.0})
    row = runner.measure(case, CPU, True, 10.0)
    assert (row["ratio"], row["ratio_vs_bnb"], row["other_baselines"]) == (3.0, 12.0, {"bnb": "bitsandbytes"})
    assert "3.00x" in runner._table_line(row) and "12.00x vs bitsandbytes" in runner._table_line(row)


@pytest.mark.parametrize("kw, message", [
    (dict(other_baselines={"bnb": "bitsandbytes"}), r"op 4: other_baselines \['bnb'\] are not timed in also \[\]"),
    (dict(baseline_variants={"dense": lambda: None}), "op 4: baseline variant 'dense' has the baseline's name"),
])
def test_a_case_names_each_timing_once(kw, message):
    with pytest.raises(ValueError, match=message):
        Case("op", [4], "float32", ours=lambda: None, baseline=lambda: None, baseline_name="dense",
             check=lambda: None, **kw)


def test_decode_layers_match_the_reference_and_bitsandbytes_runs_its_inference_path():
    from bitsandbytes.functional import has_avx512bf16

    for case in decode.cases(CPU, quick=True):
        case.check()
        assert case.info["bnb_cpu_inference_layout"] == has_avx512bf16()  # eval, no grad: its CPU inference path


def test_generate_compares_the_same_bytes():
    """ours and bitsandbytes' twin give the same next-token logits; the bf16 model (other
    weights) does not pass for them."""
    from transformers import AutoModelForCausalLM

    from qlora_kernels.finetune.presets import model_config
    from qlora_kernels.patching.quantize import quantize_model

    torch.manual_seed(0)
    bf16 = AutoModelForCausalLM.from_config(model_config("llama", "test", 16), dtype=torch.bfloat16).eval()
    ours = quantize_model(copy.deepcopy(bf16), progress=False).eval()
    prompt = torch.randint(0, 256, (1, 8))
    assert decode._first_step_check(ours, decode.bnb_twin(ours), prompt) < 5e-2
    with pytest.raises(JobFailed, match="first-step logits differ from bitsandbytes'"):
        decode._first_step_check(ours, bf16, prompt)


def test_generate_refuses_a_different_token_count():
    model = types.SimpleNamespace(generate=lambda ids, **kw: torch.zeros(1, ids.shape[1] + 2, dtype=torch.long),
                                  config=types.SimpleNamespace(pad_token_id=0))
    with pytest.raises(JobFailed, match="generate made 2 tokens, not 4"):
        decode._generate(model, torch.zeros(1, 3, dtype=torch.long), new_tokens=4)


def _git(folder, *args) -> str:
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_source_commit_of_a_checkout(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "pkg")
    _git(tmp_path, "commit", "-qm", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert source_commit(package) == {"commit": head, "dirty": False}
    (package / "__init__.py").write_text("x = 2\n")
    assert source_commit(package) == {"commit": head, "dirty": True}


def test_source_commit_of_an_installed_package(tmp_path):
    package = tmp_path / "venv" / "site-packages" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    outside = source_commit(package)
    assert outside["commit"] is None and outside["reason"].startswith(f"no git checkout at {package}: ")
    _git(tmp_path, "init", "-q")  # a virtual environment inside a checkout's folder, not part of it
    assert source_commit(package) == {"commit": None, "reason": f"{package} is not tracked by the git checkout "
                                                                f"{tmp_path} (an installed package)"}


def test_loss_rows_report_both_peaks_and_their_ratio(monkeypatch):
    """The loss suite checks ours against lm_head + ForCausalLMLoss (loss and gradients), and its
    rows carry the peak of each side, measured in a fresh process on a CPU."""
    from qlora_kernels.bench import loss

    peaks = []

    def cpu_peak_mb(setup, stmt):
        peaks.append((setup, stmt))
        return 10.0 if "fused_linear_cross_entropy" in stmt else 50.0

    monkeypatch.setattr(runner, "cpu_peak_mb", cpu_peak_mb)
    monkeypatch.setattr(runner, "median_ms", lambda fn, device, quick: 1.0)
    cases = list(loss.cases(CPU, quick=True))
    rows = [runner.measure(case, CPU, True, 10.0) for case in cases]
    assert [r["lm_head"] for r in rows] == ["frozen", "trainable"]
    assert all((r["ours_peak_MB"], r["baseline_peak_MB"], r["peak_ratio"]) == (10.0, 50.0, 0.2) for r in rows)
    assert rows[0]["roofline"].endswith("peak 10.0 vs 50.0 MB (0.20x)")
    # each side's statement is a training step of what the row times, after the row's own setup
    assert [stmt.count("weight.grad = None") for _, stmt in peaks] == [0, 0, 1, 1]
    assert "ForCausalLMLoss" in peaks[1][1] and peaks[0][0] == peaks[1][0]


def test_loss_case_fails_its_check_when_ours_is_wrong(monkeypatch):
    from qlora_kernels.bench import loss

    case = next(loss.cases(CPU, quick=True))
    case.check()
    monkeypatch.setattr(loss, "OURS", loss.OURS.replace("shifted", "shifted.roll(1)"))
    with pytest.raises(JobFailed, match="linear \\+ cross-entropy fwd\\+bwd .*differs"):
        runner.measure(next(loss.cases(CPU, quick=True)), CPU, True, 10.0)


def test_fused_loss_peak_is_a_fraction_of_stock_in_a_fresh_process():
    """8192 tokens x 4096 ids: 128 MB of fp32 logits and as much for their gradient in stock;
    ours in chunks of 1024 tokens (the default chunk holds 64 MiB of logits: at the suite's
    vocabulary of 32,000, 512 tokens)."""
    from qlora_kernels.bench import loss
    from qlora_kernels.bench.memory import cpu_peak_mb

    setup = loss.SETUP.format(device="cpu", trainable=False, batch=2, seq=4096, vocab=4096, hidden=16)
    ours = cpu_peak_mb(setup, loss._training_step(loss.OURS.replace("shifted)", "shifted, chunk_size=1024)"),
                                                  ("hidden",)))
    stock = cpu_peak_mb(setup, loss._training_step(loss.STOCK, ("hidden",)))
    assert stock > 200 and ours < 0.2 * stock, (ours, stock)
