"""`make demo` / `qlora-kernels finetune`: QLoRA fine-tuning, stock vs patched, side by side.

Builds a random-init Llama, OPT or Bloom model from a size preset (no download), saves it
as a bf16 checkpoint under the run folder and fine-tunes it twice from that checkpoint with
the recipe most QLoRA users run:

    from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double quant, bf16 compute
                    and storage), attn_implementation="sdpa")   # Bloom has no SDPA: "eager"
    prepare_model_for_kbit_training(model)                      # gradient checkpointing on
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))

"stock" trains that model as is; "patched" adds `qlora_kernels.patch(model)`. Both use the
same seed and the same batches: byte-level tokens (vocab 256 + a pad id) of the Python
standard library's .py sources, which every machine has. Each side runs in a fresh process
(so that peak memory is its own), shows a progress bar and the first step's loss of both is
compared before anything is timed. Writes `finetune.json` (config, device, versions, per-step
losses and times of both, summary) and `finetune.png` (loss curves, throughput and memory bars)
to `<out>/finetune-<family>-<size>-<yyyymmdd-HHMMSS>/`.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

VOCAB = 257  # 256 byte values + a pad id that never occurs in the text
PAD_ID = 256
FAMILIES = ("llama", "opt", "bloom")
SIDES = ("stock", "patched")
FIRST_LOSS_RTOL = 0.02  # bf16 compute: a real bug is far off, rounding is ~1e-3 at most

# Model shapes. 7b: Llama-2-7B, OPT-6.7B, BLOOM-7b1; 1b: TinyLlama-1.1B, OPT-1.3B, BLOOM-1b1;
# small / tiny / test: CPU-sized shapes of the same families (test is for the test suite).
PRESETS: dict[str, dict[str, dict]] = {
    "llama": {
        "test": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1),
        "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4),
        "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8),
        "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4),
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32),
    },
    "opt": {
        "test": dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=2),
        "tiny": dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4),
        "small": dict(hidden_size=512, ffn_dim=2048, num_hidden_layers=8, num_attention_heads=8),
        "1b": dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32),
        "7b": dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32),
    },
    "bloom": {
        "test": dict(hidden_size=64, n_layer=2, n_head=2),
        "tiny": dict(hidden_size=256, n_layer=4, n_head=4),
        "small": dict(hidden_size=512, n_layer=8, n_head=8),
        "1b": dict(hidden_size=1536, n_layer=24, n_head=16),
        "7b": dict(hidden_size=4096, n_layer=30, n_head=32),
    },
}
SIZES = tuple(PRESETS["llama"])
# per size: sequence length, batch size, steps, learning rate. The base model is random, so
# only LoRA learns (the byte statistics of Python source); the CPU sizes use a larger rate
# than QLoRA's 2e-4 to show a falling loss in few steps.
RUN_DEFAULTS = {
    "test": dict(seq_len=32, batch_size=2, steps=3, lr=1e-3),
    "tiny": dict(seq_len=256, batch_size=4, steps=50, lr=1e-3),
    "small": dict(seq_len=512, batch_size=4, steps=40, lr=1e-3),
    "1b": dict(seq_len=2048, batch_size=1, steps=30, lr=2e-4),
    "7b": dict(seq_len=2048, batch_size=1, steps=30, lr=2e-4),
}


# --- model -------------------------------------------------------------------------------

def model_config(family: str, size: str, seq_len: int):
    """A transformers config for the preset: byte vocabulary, no dropout in the base model
    (released OPT configs use 0.1; off here so the two sides see the same forward pass and
    their losses can be compared; LoRA's own dropout 0.1 stays)."""
    from transformers import BloomConfig, LlamaConfig, OPTConfig

    shape = PRESETS[family][size]
    ids = dict(vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=PAD_ID, eos_token_id=PAD_ID)
    if family == "llama":
        return LlamaConfig(**shape, **ids, max_position_embeddings=max(4096, seq_len), rms_norm_eps=1e-5,
                           tie_word_embeddings=False)
    if family == "opt":
        return OPTConfig(**shape, **ids, word_embed_proj_dim=shape["hidden_size"],
                         max_position_embeddings=max(2048, seq_len), dropout=0.0, attention_dropout=0.0)
    if family == "bloom":
        return BloomConfig(**shape, **ids, hidden_dropout=0.0, attention_dropout=0.0)
    raise ValueError(f"unknown model family {family!r}; one of {FAMILIES}")


def build_checkpoint(family: str, size: str, seq_len: int, seed: int, device: torch.device, path: Path) -> dict:
    """Random-init bf16 model saved to `path`; returns facts about it.

    Why a bf16 checkpoint on disk rather than quantizing in memory: both sides must start
    from the same weights in separate fresh processes, and the stock side must take the
    unmodified `from_pretrained(..., quantization_config=...)` path (bitsandbytes quantizes
    on load), not our quantizer nor transformers internals. For 7b this is 13.5 GB of disk
    and about a minute; the folder is removed after the run unless --keep-checkpoint.
    The weights are drawn on `device` (a 7B CPU init takes minutes, on a GPU seconds).
    """
    from transformers import AutoModelForCausalLM

    config = model_config(family, size, seq_len)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="2GB")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"parameters": n_params, "config": config.to_diff_dict()}


# --- data --------------------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_sources() -> list[Path]:
    """The standard library's .py files in a fixed order (test suites and installed packages
    left out: some distributions ship them separately)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def make_batches(steps: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    """[steps, batch, seq] byte ids: the first steps * batch * seq bytes of the standard
    library's sources cut into sequences, in a seeded order. Same arguments, same batches."""
    need = steps * batch_size * seq_len
    chunks, have, used = [], 0, 0
    for path in stdlib_sources():
        data = path.read_bytes()
        chunks.append(data)
        have += len(data)
        used += 1
        if have >= need:
            break
    text = b"".join(chunks)
    if not text:
        raise RuntimeError(f"no .py sources under {sysconfig.get_paths()['stdlib']}")
    repeats = math.ceil(need / len(text))
    text = (text * repeats)[:need]
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).view(steps * batch_size, seq_len)
    order = torch.randperm(steps * batch_size, generator=torch.Generator().manual_seed(seed))
    info = {"source": "Python standard library .py files (sysconfig stdlib), byte-level",
            "stdlib": sysconfig.get_paths()["stdlib"], "python": platform.python_version(), "files": used,
            "bytes": need, "repeated": repeats > 1, "sha256": hashlib.sha256(text).hexdigest()}
    return ids[order].view(steps, batch_size, seq_len).clone(), info


# --- one side ----------------------------------------------------------------------------

def _quiet() -> None:
    """Keep the progress bars readable: library deprecation notes and load bars off."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`(gradient|is_gradient)_checkpointing\w*` is deprecated")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def load_model(spec: dict, side: str):
    """The QLoRA recipe on the saved checkpoint; `side == "patched"` adds qlora_kernels.patch."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(spec["device"])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation=spec["stock_attention"], device_map=device_map)
    # use_reentrant=False is transformers' own default; PEFT passes no value, which torch warns about
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(spec["seed"])  # LoRA A init: the same on both sides
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    patch_info = None
    if side == "patched":
        import qlora_kernels

        model = qlora_kernels.patch(model)  # strict: an unsupported layer raises instead of falling back
        patch_info = str(qlora_kernels.patch_report(model))
    # bitsandbytes' Linear4bit repacks its weights for CPU inference in eval mode: stay in train
    model.train()
    return model, patch_info


def train_side(spec: dict, side: str, batches: torch.Tensor, expect_first_loss: float | None = None,
               progress: bool = True) -> dict:
    """Load, (patch), train `spec["steps"]` steps; per-step losses and times, peak memory."""
    from tqdm.auto import tqdm

    _quiet()
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    model, patch_info = load_model(spec, side)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_checksum = float(sum(p.detach().double().sum() for p in trainable))
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"])
    load_s = time.perf_counter() - t0
    batches = batches.to(device=device, dtype=torch.long)
    torch.manual_seed(spec["seed"])  # dropout

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    else:
        peak_ok = _reset_peak_rss()
        start_kib = _rss_kib("VmRSS")
    losses, times = [], []
    bar = tqdm(range(spec["steps"]), desc=f"{side:>7}", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        ids = batches[step]
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        value = loss.item()
        if step == 0 and expect_first_loss is not None:  # before anything is timed
            rel = check_first_loss(expect_first_loss, value)
            bar.write(f"first-step loss: stock {expect_first_loss:.6f}, patched {value:.6f}, relative difference "
                      f"{rel:.1e} (limit {FIRST_LOSS_RTOL:g})")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
        losses.append(value)
        if not math.isfinite(value):
            raise SystemExit(f"{side}: loss is {value} at step {step}")
        bar.set_postfix(loss=f"{value:.4f}")
    bar.close()

    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        above = peak - start_bytes / 2**20
        memory = "CUDA max_memory_allocated during the training loop (weights included)"
    else:
        hwm = _rss_kib("VmHWM") if peak_ok else None
        peak = hwm / 1024 if hwm is not None else None
        above = (hwm - start_kib) / 1024 if hwm is not None and start_kib is not None else None
        memory = "peak RSS of the process during the training loop (VmHWM, weights and runtime included)"
    return {"side": side, "patch": patch_info, "load_s": load_s, "losses": losses, "step_s": times,
            "peak_mb": peak, "peak_above_start_mb": above, "memory_measure": memory,
            "lora_init_checksum": lora_checksum, "trainable_parameters": sum(p.numel() for p in trainable),
            "attention": model.config._attn_implementation, "threads": torch.get_num_threads()}


def check_first_loss(stock: float, patched: float) -> float:
    """Relative difference of the first step's losses; raises if it is beyond bf16 rounding.
    LoRA B starts at zero and the base model has no dropout, so step 0 is the same function
    on both sides."""
    rel = abs(patched - stock) / max(abs(stock), 1e-12)
    if not rel <= FIRST_LOSS_RTOL:
        raise SystemExit(f"patched model disagrees with stock on the first batch: loss {patched:.6f} vs "
                         f"{stock:.6f} (relative difference {rel:.2e} > {FIRST_LOSS_RTOL})")
    return rel


def _worker() -> None:
    """Entry of the per-side subprocess: argv = spec.json, side, result.json."""
    spec_path, side, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    batches = torch.load(spec["batches"])
    result = train_side(spec, side, batches, spec.get("expect_first_loss"))
    Path(out_path).write_text(json.dumps(result))


def _run_isolated(spec: dict, side: str, run_dir: Path) -> dict:
    spec_path, out_path = run_dir / f"spec-{side}.json", run_dir / f"result-{side}.json"
    spec_path.write_text(json.dumps(spec))
    code = "from qlora_kernels.finetune import _worker; _worker()"
    rc = subprocess.run([sys.executable, "-c", code, str(spec_path), side, str(out_path)]).returncode
    if rc != 0:
        raise SystemExit(f"{side} run failed (exit code {rc})")
    result = json.loads(out_path.read_text())
    spec_path.unlink()
    out_path.unlink()
    return result


# --- the job -----------------------------------------------------------------------------

def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton", "qlora_kernels"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def _tokens_per_s(result: dict, tokens_per_step: int, warmup: int) -> float | None:
    timed = result["step_s"][warmup:]
    return tokens_per_step * len(timed) / sum(timed) if timed and sum(timed) > 0 else None


def summarize(results: dict, tokens_per_step: int, warmup: int) -> dict:
    summary = {}
    for side, r in results.items():
        timed = sorted(r["step_s"][warmup:])
        median = timed[len(timed) // 2] if len(timed) % 2 else sum(timed[len(timed) // 2 - 1:][:2]) / 2
        summary[side] = {"tokens_per_s": _tokens_per_s(r, tokens_per_step, warmup),
                         "tokens_per_s_median_step": tokens_per_step / median if median > 0 else None,
                         "peak_mb": r["peak_mb"], "peak_above_start_mb": r["peak_above_start_mb"],
                         "first_loss": r["losses"][0], "final_loss": r["losses"][-1], "load_s": r["load_s"],
                         "steps_over_3x_median": sum(t > 3 * median for t in timed)}
    if len(results) == 2:
        s, p = summary["stock"], summary["patched"]

        def ratio(key):
            return p[key] / s[key] if p[key] is not None and s[key] else None

        summary["patched_over_stock"] = {k: ratio(k) for k in ("tokens_per_s", "tokens_per_s_median_step", "peak_mb",
                                                           "peak_above_start_mb")}
        summary["first_loss_rel_diff"] = abs(p["first_loss"] - s["first_loss"]) / abs(s["first_loss"])
        summary["final_loss_gap"] = p["final_loss"] - s["final_loss"]
        summary["same_lora_init"] = results["stock"]["lora_init_checksum"] == results["patched"]["lora_init_checksum"]
    return summary


def format_table(summary: dict, memory_label: str) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [f"{'':<16}{'tokens/s':>11}{'median':>9}{'peak MB':>11}{'+MB in loop':>13}"
            f"{'first loss':>12}{'final loss':>12}"]
    for side in SIDES:
        if side in summary:
            s = summary[side]
            rows.append(f"{side:<16}{num(s['tokens_per_s'], '11.1f')}{num(s['tokens_per_s_median_step'], '9.1f')}"
                        f"{num(s['peak_mb'], '11.0f')}"
                        f"{num(s['peak_above_start_mb'], '13.0f')}{s['first_loss']:>12.5f}{s['final_loss']:>12.5f}")
    if "patched_over_stock" in summary:
        r = summary["patched_over_stock"]

        def x(v):
            return "-" if v is None else f"{v:.2f}x"

        rows.append(f"{'patched/stock':<16}{x(r['tokens_per_s']):>11}{x(r['tokens_per_s_median_step']):>9}"
                    f"{x(r['peak_mb']):>11}"
                    f"{x(r['peak_above_start_mb']):>13}{summary['first_loss_rel_diff']:>12.1e}"
                    f"{summary['final_loss_gap']:>+12.5f}")
    slow = {side: summary[side]["steps_over_3x_median"] for side in SIDES if summary.get(side, {}).get(
        "steps_over_3x_median")}
    if slow:
        rows.append("note: steps over 3x the median step time (" + ", ".join(f"{k} {v}" for k, v in slow.items()) +
                    "): something else was using this machine; the median is the steadier figure")
    rows.append("tokens/s: all timed steps (the first, warm-up, excluded); median: from the median step time")
    rows.append(f"peak MB: {memory_label}; +MB in loop: that peak minus the amount at the loop's start")
    if "patched_over_stock" in summary:
        rows.append("patched/stock row: ratios; first loss: relative difference; final loss: patched - stock")
    return "\n".join(rows)


def plot(path: Path, results: dict, summary: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [s for s in SIDES if s in results]
    colors = {"stock": "tab:gray", "patched": "tab:blue"}
    styles = {"stock": dict(linewidth=2.5, alpha=0.8), "patched": dict(linewidth=1.2, linestyle="--")}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    for side in sides:
        losses = results[side]["losses"]
        axes[0].plot(range(1, len(losses) + 1), losses, label=side, color=colors[side], **styles[side])
    axes[0].set(xlabel="step", ylabel="training loss", title="loss (same batches)")
    axes[0].legend()
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    width = 0.38
    panels = ((axes[1], "tokens/s (warm-up step excluded)", {"all timed steps": "tokens_per_s",
                                                              "median step": "tokens_per_s_median_step"}),
              (axes[2], "memory during training (MB)", {"peak": "peak_mb", "above loop start": "peak_above_start_mb"}))
    for ax, title_, keys in panels:
        for i, side in enumerate(sides):
            values = [summary[side][k] or 0.0 for k in keys.values()]
            bars = ax.bar([j + (i - (len(sides) - 1) / 2) * width for j in range(len(keys))], values, width,
                          label=side, color=colors[side])
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(keys)), list(keys))
        ax.set_title(title_)  # colours as in the loss legend
        ax.margins(y=0.12)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(family: str = "llama", size: str = "tiny", steps: int | None = None, seq_len: int | None = None,
        batch_size: int | None = None, lr: float | None = None, seed: int = 0, device: str = "auto",
        out: str = "runs", only: str = "both", isolate: bool = True, keep_checkpoint: bool = False,
        warmup_steps: int = 1) -> Path:
    """The whole job; returns the run folder."""
    wall0 = time.perf_counter()
    if family not in FAMILIES:
        raise SystemExit(f"--model must be one of {FAMILIES}")
    if size not in SIZES:
        raise SystemExit(f"--size must be one of {SIZES}")
    defaults = RUN_DEFAULTS[size]
    steps = steps or defaults["steps"]
    seq_len = seq_len or defaults["seq_len"]
    batch_size = batch_size or defaults["batch_size"]
    lr = lr or defaults["lr"]
    if steps <= warmup_steps:
        raise SystemExit(f"--steps must be more than the {warmup_steps} warm-up step(s)")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    sides = SIDES if only == "both" else (only,)

    from .bench.timing import device_name

    run_dir = Path(out) / f"finetune-{family}-{size}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=False)
    run_dir = run_dir.resolve()
    name = device_name(dev)
    print(f"qlora_kernels finetune: {family} '{size}' on {name}; {steps} steps x batch {batch_size} x seq {seq_len}, "
          f"LoRA r=8 all-linear over NF4 double quant, bf16 compute; run folder {run_dir}", flush=True)

    batches, data_info = make_batches(steps, batch_size, seq_len, seed)
    torch.save(batches, run_dir / "batches.pt")
    _quiet()
    spec = {"family": family, "size": size, "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
            "lr": lr, "seed": seed, "device": str(dev), "checkpoint": str(run_dir / "init-bf16"),
            "batches": str(run_dir / "batches.pt"),
            "stock_attention": "eager" if family == "bloom" else "sdpa"}  # Bloom has no SDPA path in transformers
    results = {}
    try:
        t = time.perf_counter()
        model_info = build_checkpoint(family, size, seq_len, seed, dev, run_dir / "init-bf16")
        print(f"random-init {family} ({model_info['parameters'] / 1e6:.1f}M parameters) saved as bf16 in "
              f"{time.perf_counter() - t:.1f} s; {' then '.join(sides)}, each in a "
              f"{'fresh process' if isolate else 'this process'}", flush=True)
        for side in sides:
            side_spec = dict(spec, expect_first_loss=results["stock"]["losses"][0] if "stock" in results else None)
            if isolate:
                results[side] = _run_isolated(side_spec, side, run_dir)
            else:
                results[side] = train_side(side_spec, side, batches, side_spec["expect_first_loss"])
                gc.collect()  # the side's model is garbage now: free it before the next side
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    finally:  # also when a side fails: a 7b checkpoint is 13.5 GB
        if not keep_checkpoint:
            shutil.rmtree(run_dir / "init-bf16", ignore_errors=True)
        (run_dir / "batches.pt").unlink(missing_ok=True)

    tokens_per_step = batch_size * seq_len
    summary = summarize(results, tokens_per_step, warmup_steps)
    if "first_loss_rel_diff" in summary:
        check_first_loss(summary["stock"]["first_loss"], summary["patched"]["first_loss"])
    if dev.type == "cuda":
        memory_label = "CUDA max_memory_allocated during the training loop"
    else:
        memory_label = "peak RSS of the side's process during the training loop" if isolate else (
            "RSS of one process shared by both sides (stock first): not comparable")
    table = format_table(summary, memory_label)
    title = (f"{family} {size}, {steps} steps x {batch_size} x {seq_len} tokens, {name}")
    print(f"\n{title}\n{table}")

    record = {
        "job": "qlora_kernels finetune", "created": dt.datetime.now().isoformat(timespec="seconds"),
        "config": {"family": family, "size": size, "shape": PRESETS[family][size], "steps": steps, "seq_len": seq_len,
                   "batch_size": batch_size, "tokens_per_step": tokens_per_step, "lr": lr, "optimizer": "AdamW",
                   "seed": seed, "warmup_steps_excluded": warmup_steps, "compute_dtype": "bfloat16",
                   "quantization": "bitsandbytes NF4, double quant, bf16 storage (from_pretrained)",
                   "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
                   "gradient_checkpointing": "prepare_model_for_kbit_training, use_reentrant=False",
                   "stock_attention": spec["stock_attention"], "isolated_processes": isolate,
                   "model": model_info},
        "device": {"type": dev.type, "name": name, "threads": torch.get_num_threads()},
        "versions": _versions(), "data": data_info, "memory_measure": memory_label,
        "runs": results, "summary": summary, "wall_s": None,
    }
    plot(run_dir / "finetune.png", results, summary, title)
    record["wall_s"] = time.perf_counter() - wall0
    (run_dir / "finetune.json").write_text(json.dumps(record, indent=2))
    print(f"\nwrote {run_dir / 'finetune.json'} and {run_dir / 'finetune.png'} ({record['wall_s']:.0f} s in all)")
    return run_dir
