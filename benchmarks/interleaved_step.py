"""Training-step time of the finetune job's QLoRA model, stock and patched variants in ONE
process with their steps interleaved (stock, LoRA only, attention only, both, stock, ...), so
that a machine whose speed drifts (a shared VM) slows every variant alike. `qlora-kernels
finetune` runs the two sides one after the other in fresh processes (for their peak memory),
which such drift can tilt; this script is the steadier speed comparison.

    .venv/bin/python benchmarks/interleaved_step.py [--model llama] [--size tiny] [--steps 12] [--no-dropout]

Prints the median and the fastest step time of each variant (the first two steps of each are
warm-up, not timed). Same checkpoint, batch and LoRA init for all variants; memory is not
measured here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

import qlora_kernels as qk
from qlora_kernels import finetune as ft
from qlora_kernels.finetune.recipe import build_checkpoint, load_model

VARIANTS = {"stock": None, "lora only": dict(attention=False), "attention only": dict(lora=False), "both": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama", choices=ft.FAMILIES)
    parser.add_argument("--size", default="tiny", choices=ft.SIZES)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--no-dropout", action="store_true", help="LoRA dropout 0 (the recipe uses 0.1)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    defaults = ft.RUN_DEFAULTS[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = ft.make_batches(1, defaults["batch_size"], defaults["seq_len"], 0)[0][0].to(device, torch.long)
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(args.model, args.size, defaults["seq_len"], 0, device, Path(tmp))
        spec = dict(device=str(device), checkpoint=tmp, seed=0, lr=defaults["lr"],
                    stock_attention="eager" if args.model == "bloom" else "sdpa")
        steps = {}
        for name, options in VARIANTS.items():
            model, _ = load_model(spec, "stock")
            if options is not None:
                qk.patch(model, **options)
            if args.no_dropout:
                for m in model.modules():
                    if hasattr(m, "lora_dropout"):
                        m.lora_dropout["default"] = torch.nn.Identity()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])

            def step(model=model, optimizer=optimizer):
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            step(), step()
            steps[name] = step
        times = {name: [] for name in steps}
        for _ in range(args.steps):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    dropout = "LoRA dropout 0" if args.no_dropout else "LoRA dropout 0.1"
    print(f"{args.model} {args.size}, {args.steps} interleaved steps per variant, {dropout}, {device}")
    stock = sorted(times["stock"])[len(times["stock"]) // 2]
    for name, ts in times.items():
        median = sorted(ts)[len(ts) // 2]
        print(f"{name:<16} median {median * 1e3:8.1f} ms  fastest {min(ts) * 1e3:8.1f} ms  "
              f"stock/this {stock / median:5.2f}x")


if __name__ == "__main__":
    main()
