"""One side of the finetune job: load with the recipe, train, and measure per-step loss and
time and the peak memory of the training loop (CUDA allocator, or the process's peak RSS)."""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import torch

from ..errors import JobFailed
from .recipe import load_model

FIRST_LOSS_RTOL = 0.02  # bf16 compute: a real bug is far off, rounding is ~1e-3 at most


def quiet() -> None:
    """Keep the progress bars readable: library deprecation notes and load bars off."""
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


def check_first_loss(stock: float, patched: float) -> float:
    """Relative difference of the first step's losses; JobFailed if it is beyond bf16 rounding.
    LoRA B starts at zero and the base model has no dropout, so step 0 is the same function
    on both sides."""
    rel = abs(patched - stock) / max(abs(stock), 1e-12)
    if not rel <= FIRST_LOSS_RTOL:
        raise JobFailed(f"patched model disagrees with stock on the first batch: loss {patched:.6f} vs "
                        f"{stock:.6f} (relative difference {rel:.2e} > {FIRST_LOSS_RTOL})")
    return rel


def train_side(spec: dict, side: str, batches: torch.Tensor, expect_first_loss: float | None = None,
               progress: bool = True) -> dict:
    """Load, (patch), train `spec["steps"]` steps; per-step losses and times, peak memory."""
    from tqdm.auto import tqdm

    quiet()
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
            raise JobFailed(f"{side}: loss is {value} at step {step}")
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
