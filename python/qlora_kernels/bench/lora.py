"""Fused LoRA linear: ours vs PEFT over nn.Linear, vs PEFT over bitsandbytes Linear4bit (the
QLoRA stack) and vs a plain bf16 x·Wᵀ without LoRA (the ceiling), on the same device. On a GPU the
NF4 rows above 16 tokens also time the fused kernel and dequantize-once + cuBLAS each forced
(`fused_ms`, `dequant_once_ms`), over a sweep of token counts around the threshold between them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..lora import lora_linear
from ..modules import NF4Linear
from .case import Case, close_check, step


# NF4 rows around the CUDA backend's LORA_DEQUANT_ONCE_MIN_TOKENS (first shape, rank 16), each
# also timing the fused kernel and dequantize-once forced: the threshold is set from them
THRESHOLD_TOKENS = (128, 256, 512, 1024, 2048)


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


def _adapter(layer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def cases(device: torch.device, quick: bool) -> Iterator[Case]:
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
    for out_features, in_features in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype).requires_grad_(False)
        nf4 = NF4Linear.from_linear(linear, compute_dtype=dtype, quant_storage=torch.bfloat16)
        for rank in ranks:
            peft_dense, dense_layer = _peft_layer(linear, rank)
            peft_bnb, bnb_layer = _peft_layer(_bnb_base(linear, device), rank)
            with torch.no_grad():
                for theirs, ours in zip(_adapter(bnb_layer), _adapter(dense_layer)):
                    theirs.copy_(ours)
            sweep = gpu and (out_features, in_features) == shapes[0] and rank == 16
            for m in sorted(set(tokens) | set(THRESHOLD_TOKENS)) if sweep else tokens:
                x = torch.randn(m, in_features, device=device, dtype=dtype, requires_grad=True)
                for backward in ((False,) if m <= 16 else (False, True)):
                    if m in tokens:
                        yield _case("dense", linear.weight, peft_dense, dense_layer, linear.weight, x, backward, gpu)
                    yield _case("nf4", nf4, peft_bnb, bnb_layer, linear.weight, x, backward, gpu)


def _case(base: str, weight, peft: nn.Module, peft_layer, dense_weight: torch.Tensor, x: torch.Tensor,
          backward: bool, gpu: bool) -> Case:
    """lora_linear over `weight` with PEFT's adapter vs `peft` itself; one forward or one training step."""
    A, B = _adapter(peft_layer)
    scaling = peft_layer.scaling["default"]
    ours = lambda: lora_linear(x, weight, None, A, B, scaling)  # noqa: E731
    theirs = lambda: peft(x)  # noqa: E731
    ceiling = lambda: x @ dense_weight.t()  # noqa: E731
    grad_of = (x, A, B) if backward else ()
    out_features, in_features = dense_weight.shape
    also = {"bf16_mm": step(ceiling, grad_of[:1])}
    if gpu and base == "nf4" and x.shape[0] > 16:
        also["fused"] = _with_min_tokens(sys.maxsize, step(ours, grad_of))
        also["dequant_once"] = _with_min_tokens(0, step(ours, grad_of))
    return Case(
        op=f"lora_linear {base} {'fwd+bwd' if backward else 'fwd'}",
        shape=f"m{x.shape[0]} {in_features}->{out_features} r{A.shape[0]}", dtype="bfloat16",
        ours=step(ours, grad_of), baseline=step(theirs, grad_of),
        baseline_name="PEFT over nn.Linear" if base == "dense" else "PEFT over bnb Linear4bit",
        check=close_check(ours, theirs, grad_of, grad_of, atol=1e-2),
        also=also,
        roofline=lambda ms, _: {"roofline": f"{ms['ours'] / ms['bf16_mm']:.2f}x plain bf16 mm time"},
        peak_memory=gpu and backward,
    )


def _with_min_tokens(min_tokens: int, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the CUDA backend's dequantize-once threshold at `min_tokens`."""
    from ..backends import cuda as cuda_backend

    def run():
        saved = cuda_backend.LORA_DEQUANT_ONCE_MIN_TOKENS
        cuda_backend.LORA_DEQUANT_ONCE_MIN_TOKENS = min_tokens
        try:
            return fn()
        finally:
            cuda_backend.LORA_DEQUANT_ONCE_MIN_TOKENS = saved
    return run
