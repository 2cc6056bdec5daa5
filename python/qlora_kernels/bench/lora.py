"""Fused LoRA linear: ours vs PEFT over nn.Linear, vs PEFT over bitsandbytes Linear4bit (the
QLoRA stack) and vs a plain bf16 x·Wᵀ without LoRA (the ceiling), on the same device."""

from __future__ import annotations

import torch
from torch import nn

from ..lora import lora_linear
from ..modules import NF4Linear
from .memory import cuda_peak_mb
from .timing import median_ms


def _peft_layer(base: nn.Module, rank: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"],
                                                           lora_dropout=0.0))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return model, layer


def _bnb_base(linear: nn.Linear, device):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16)
    layer.load_state_dict(linear.state_dict())
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    return layer.to(device).train()  # train mode: bitsandbytes' CPU inference repacking stays off


def _step(fn, x, params, backward):
    if not backward:
        return fn

    def run():
        y = fn()
        y.backward(torch.ones_like(y))
        for t in (x, *params):
            t.grad = None
    return run


def bench(device: torch.device, quick: bool, copy_gbps: float) -> list[dict]:
    gpu = device.type == "cuda"
    if gpu:
        shapes = ((4096, 4096),) if quick else ((4096, 4096), (11008, 4096), (4096, 11008))
        tokens = (1, 16, 4096) if quick else (1, 16, 4096, 16384)
        ranks = (16,) if quick else (8, 16, 64)
    else:
        shapes = ((1024, 4096),)
        tokens = (16, 512) if quick else (1, 16, 512)
        ranks = (16,)
    dtype = torch.bfloat16
    rows = []
    for out_features, in_features in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype).requires_grad_(False)
        nf4 = NF4Linear.from_linear(linear, compute_dtype=dtype, quant_storage=torch.bfloat16)
        for rank in ranks:
            peft_dense, dense_layer = _peft_layer(linear, rank)
            peft_bnb, bnb_layer = _peft_layer(_bnb_base(linear, device), rank)
            A, B = dense_layer.lora_A["default"].weight, dense_layer.lora_B["default"].weight
            with torch.no_grad():
                bnb_layer.lora_A["default"].weight.copy_(A)
                bnb_layer.lora_B["default"].weight.copy_(B)
            scaling = dense_layer.scaling["default"]
            for m in tokens:
                x = torch.randn(m, in_features, device=device, dtype=dtype, requires_grad=True)
                with torch.no_grad():
                    want = peft_dense(x)
                    got = lora_linear(x, linear.weight, None, A, B, scaling)
                    err = (got.float() - want.float()).abs().max().item()
                    if err > 2e-2 * want.float().abs().max().item() + 1e-2:
                        raise AssertionError(f"lora m={m} r={rank}: ours differs from PEFT by {err:.3g}")
                for backward in ((False,) if m <= 16 else (False, True)):
                    params = (A, B)
                    ours = {
                        "dense": _step(lambda: lora_linear(x, linear.weight, None, A, B, scaling), x, params, backward),
                        "nf4": _step(lambda: lora_linear(x, nf4, None, A, B, scaling), x, params, backward),
                    }
                    baselines = {
                        "dense": ("PEFT over nn.Linear", _step(lambda: peft_dense(x), x, params, backward)),
                        "nf4": ("PEFT over bnb Linear4bit", _step(lambda: peft_bnb(x), x, params, backward)),
                    }
                    ceiling = median_ms(_step(lambda: x @ linear.weight.t(), x, (), backward), device, quick)
                    for base in ("dense", "nf4"):
                        name, theirs = baselines[base]
                        ours_ms = median_ms(ours[base], device, quick)
                        base_ms = median_ms(theirs, device, quick)
                        row = {
                            "op": f"lora_linear {base} {'fwd+bwd' if backward else 'fwd'}",
                            "shape": f"m{m} {in_features}->{out_features} r{rank}", "dtype": "bfloat16",
                            "ours_ms": round(ours_ms, 4), "baseline": name, "baseline_ms": round(base_ms, 4),
                            "ratio": round(base_ms / ours_ms, 3), "bf16_mm_ms": round(ceiling, 4),
                            "roofline": f"{ours_ms / ceiling:.2f}x plain bf16 mm time",
                        }
                        if gpu and backward:
                            row["ours_peak_MB"] = round(cuda_peak_mb(ours[base]), 1)
                            row["baseline_peak_MB"] = round(cuda_peak_mb(theirs), 1)
                        rows.append(row)
    return rows
