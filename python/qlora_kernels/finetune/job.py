"""The finetune job from start to end: the checkpoint, each side in its own process (so that
peak memory is its own), the first-loss check, the printed table, finetune.json and the plot."""

from __future__ import annotations

import datetime as dt
import gc
import importlib.util
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..bench.source import source_commit
from ..errors import JobFailed
from .data import make_batches
from .presets import PRESETS, RunConfig
from .presets import VOCAB as BYTE_VOCAB
from .recipe import LORA, build_checkpoint, stock_attention
from .report import format_table, plot, summarize
from .train import check_first_loss, quiet, train_side

# what the job imports beyond torch, and the extras of this package that install them
NEEDS = {"transformers": "hf", "peft": "hf", "bitsandbytes": "hf", "accelerate": "hf", "matplotlib": "bench"}

_LOGGER = "qlora_kernels"


def _check_dependencies() -> None:
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        extras = ",".join(sorted({NEEDS[name] for name in missing}))
        raise JobFailed(f"the finetune job needs {', '.join(missing)}: pip install 'qlora-kernels[{extras}]'")


class _Records(logging.Handler):
    """The side process's qlora_kernels log records, sent back to the parent, whose logging
    configuration (the command line's, or the caller's) decides what is shown."""

    def __init__(self):
        super().__init__()
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"name": record.name, "level": record.levelno, "message": record.getMessage()})


def _worker() -> None:
    """Entry of the per-side process: argv = spec.json, side, result.json. The result file
    holds the side's figures, or the message of a JobFailed (one line for the user, not a
    traceback from a child process)."""
    spec_path, side, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    logger = logging.getLogger(_LOGGER)
    logger.setLevel(spec["log_level"])
    records = _Records()
    logger.addHandler(records)
    batches = torch.load(spec["batches"])
    try:
        result = {"result": train_side(spec, side, batches, spec.get("expect_first_loss"))}
    except JobFailed as e:
        result = {"error": str(e)}
    Path(out_path).write_text(json.dumps(dict(result, log=records.records)))


def _run_isolated(spec: dict, side: str, run_dir: Path) -> dict:
    name = side.replace(" ", "_")
    spec_path, out_path = run_dir / f"spec-{name}.json", run_dir / f"result-{name}.json"
    spec_path.write_text(json.dumps(dict(spec, log_level=logging.getLogger(_LOGGER).getEffectiveLevel())))
    code = "from qlora_kernels.finetune.job import _worker; _worker()"
    rc = subprocess.run([sys.executable, "-c", code, str(spec_path), side, str(out_path)]).returncode
    spec_path.unlink()
    if rc != 0 or not out_path.exists():
        raise JobFailed(f"the {side} side's process failed (exit code {rc}; its output is above)")
    answer = json.loads(out_path.read_text())
    out_path.unlink()
    for record in answer["log"]:
        logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])
    if "error" in answer:
        raise JobFailed(answer["error"])
    return answer["result"]


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


def run(family: str = "llama", size: str = "tiny", steps: int | None = None, seq_len: int | None = None,
        batch_size: int | None = None, lr: float | None = None, seed: int = 0, device: str = "auto",
        out: str = "runs", only: str = "both", isolate: bool = True, keep_checkpoint: bool = False,
        warmup_steps: int = 1, vocab: int | None = None, parts: str | list[str] | None = None) -> Path:
    """The whole job; returns the run folder. JobArgumentError for arguments it cannot run
    with (before anything is built), JobFailed when it cannot run here or the sides disagree.

    vocab: the model's vocabulary (default 257, the bytes and a pad id; the data stay bytes).
    parts: None (stock vs patched), or the parts of `presets.PARTS` to switch off one at a time:
    stock, every part on ("patched") and every part on but one ("patched -<part>") for each,
    each in its own process, so that each part's effect on tokens/s and peak memory shows."""
    wall0 = time.perf_counter()
    cfg = RunConfig.resolve(family, size, steps, seq_len, batch_size, lr, seed, device, only, warmup_steps, vocab,
                            parts)
    _check_dependencies()
    dev = cfg.device
    source = source_commit()  # before anything runs: a commit made while the job runs is not what it measured

    from ..bench.timing import device_name

    run_dir = Path(out) / f"finetune-{cfg.family}-{cfg.size}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=False)
    run_dir = run_dir.resolve()
    name = device_name(dev)
    print(f"qlora_kernels finetune: {cfg.family} '{cfg.size}' (vocabulary {cfg.vocab}) on {name}; {cfg.steps} "
          f"steps x batch {cfg.batch_size} x seq {cfg.seq_len}, LoRA r={LORA['r']} all-linear over NF4 double quant, "
          f"bf16 compute; run folder {run_dir}", flush=True)
    for part, why in cfg.not_applicable.items():
        print(f"--parts: {part} left out: {why}", flush=True)

    batches, data_info = make_batches(cfg.steps, cfg.batch_size, cfg.seq_len, cfg.seed)
    torch.save(batches, run_dir / "batches.pt")
    quiet()
    spec = {"family": cfg.family, "size": cfg.size, "steps": cfg.steps, "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "device": str(dev),
            "checkpoint": str(run_dir / "init-bf16"), "batches": str(run_dir / "batches.pt"),
            "stock_attention": stock_attention(cfg.family)}
    configurations = cfg.configurations
    results = {}
    try:
        t = time.perf_counter()
        model_info = build_checkpoint(cfg.family, cfg.size, cfg.seq_len, cfg.seed, dev, run_dir / "init-bf16",
                                      cfg.vocab)
        print(f"random-init {cfg.family} ({model_info['parameters'] / 1e6:.1f}M parameters) saved as bf16 in "
              f"{time.perf_counter() - t:.1f} s; {' then '.join(configurations)}, each in a "
              f"{'fresh process' if isolate else 'this process'}", flush=True)
        for side, patch_kwargs in configurations.items():
            side_spec = dict(spec, patch=patch_kwargs,
                             expect_first_loss=results["stock"]["losses"][0] if "stock" in results else None)
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

    summary = summarize(results, cfg.tokens_per_step, cfg.warmup_steps, cfg.parts)
    if "stock" in summary:
        for side in results:
            check_first_loss(summary["stock"]["first_loss"], summary[side]["first_loss"])
    if dev.type == "cuda":
        memory_label = "CUDA max_memory_allocated during the training loop"
    else:
        memory_label = "peak RSS of the side's process during the training loop" if isolate else (
            "RSS of one process shared by the sides (stock first): not comparable")
    table = format_table(summary, memory_label)
    vocab_note = "" if cfg.vocab == BYTE_VOCAB else f" vocab {cfg.vocab}"
    title = f"{cfg.family} {cfg.size}{vocab_note}, {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, {name}"
    print(f"\n{title}\n{table}")

    record = {
        "job": "qlora_kernels finetune", "created": dt.datetime.now().isoformat(timespec="seconds"),
        "config": {"family": cfg.family, "size": cfg.size, "shape": PRESETS[cfg.family][cfg.size],
                   "steps": cfg.steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                   "tokens_per_step": cfg.tokens_per_step, "lr": cfg.lr, "optimizer": "AdamW", "seed": cfg.seed,
                   "warmup_steps_excluded": cfg.warmup_steps, "compute_dtype": "bfloat16",
                   "quantization": "bitsandbytes NF4, double quant, bf16 storage (from_pretrained)",
                   "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"],
                            "target_modules": LORA["target_modules"]},
                   "gradient_checkpointing": "prepare_model_for_kbit_training, use_reentrant=False",
                   "stock_attention": spec["stock_attention"], "isolated_processes": isolate,
                   "vocab": cfg.vocab, "parts": list(cfg.parts) if cfg.parts is not None else None,
                   "parts_not_applicable": cfg.not_applicable, "configurations": configurations,
                   "model": model_info},
        "device": {"type": dev.type, "name": name, "threads": torch.get_num_threads()},
        "versions": _versions(), "source": source, "data": data_info, "memory_measure": memory_label,
        "runs": results, "summary": summary, "wall_s": None,
    }
    plot(run_dir / "finetune.png", results, summary, title)
    record["wall_s"] = time.perf_counter() - wall0
    (run_dir / "finetune.json").write_text(json.dumps(record, indent=2))
    print(f"\nwrote {run_dir / 'finetune.json'} and {run_dir / 'finetune.png'} ({record['wall_s']:.0f} s in all)")
    return run_dir
