"""Decoding: NF4Linear at 1 to 16 tokens against a bf16 nn.Linear and bitsandbytes' Linear4bit
in inference mode, and generate() tokens/s of a quantize_model'd Llama against the same model
in bf16 and under bitsandbytes 4-bit (the same NF4 bytes)."""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import JobFailed
from ..modules import NF4Linear
from ..patching.quantize import quantize_model, to_bnb
from ..reference import nf4 as reference
from .case import Case, bandwidth, other_baseline_ratios
from .timing import last_level_cache_bytes

# (out_features, in_features): Llama-2-7B's gate/up and down projections
SHAPES = {"llama-7b gate/up 11008x4096": (11008, 4096), "llama-7b down 4096x11008": (4096, 11008)}
# bitsandbytes' CPU inference layout needs out_features % 32 == 0 and whole blocks per row
QUICK_SHAPES = {"tiny 128x64": (128, 64), "tiny 64x128": (64, 128)}
TOKENS = (1, 4, 16)
BNB = {"bnb_linear4bit": "bitsandbytes Linear4bit, eval"}

# generate(): greedy, batch 1, KV cache on, a fixed prompt and number of new tokens
GENERATE = {"size": "small", "prompt_tokens": 16, "new_tokens": 64, "rounds": 5}
QUICK_GENERATE = {"size": "test", "prompt_tokens": 8, "new_tokens": 4, "rounds": 2}


def bnb_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose NF4Linear layers are bitsandbytes Linear4bit over
    copies of the same NF4 bytes: what bitsandbytes runs for inference on this device."""
    twin = copy.deepcopy(model)
    for layer in twin.modules():
        if isinstance(layer, NF4Linear):
            layer.bnb_origin = {"compute_dtype": layer.compute_dtype, "compute_type_is_set": True}
    return to_bnb(twin).eval()


def cold_copies(nbytes: int, device: torch.device, quick: bool) -> int:
    """How many copies of a layer's weights the timed calls go round, so that each call reads
    its weights from memory as decoding a model larger than the caches does. On CPU the copies
    span twice the last-level cache; on GPU do_bench flushes L2 between calls; quick mode
    measures nothing and keeps one."""
    if device.type == "cuda" or quick:
        return 1
    return math.ceil(2 * last_level_cache_bytes() / nbytes) + 1


def _round_robin(layers: list[nn.Module], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    turn = itertools.cycle(layers)

    def call():
        with torch.no_grad():
            return next(turn)(x)
    return call


def _weight_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])


def _reference_output(layer: NF4Linear, x: torch.Tensor) -> torch.Tensor:
    """x · Wᵀ in fp32 over the reference dequantization of the layer's bytes (to bf16, as the layer computes)."""
    s = layer.quant_state
    w = reference.nf4_dequantize(layer.weight, s.absmax, s.blocksize, s.shape, layer.compute_dtype, s.nested_absmax,
                                 s.nested_code, s.offset, s.nested_blocksize)
    return x.float() @ w.float().t()


def _check_against_reference(layer: NF4Linear, sides: dict[str, Callable[[], torch.Tensor]],
                             x: torch.Tensor) -> Callable[[], None]:
    def check():
        want = _reference_output(layer, x)
        scale = want.abs().max().item()
        for name, fn in sides.items():
            err = (fn().float() - want).abs().max().item()
            if not err <= 1e-2 * scale:
                raise AssertionError(f"{name}'s output differs from the reference by {err:.3g} (scale {scale:.3g})")
    return check


def cases(device: torch.device, quick: bool) -> Iterator[Case]:
    for name, (out_features, in_features) in (QUICK_SHAPES if quick else SHAPES).items():
        yield from _layer_cases(name, out_features, in_features, device, quick)


def _layer_cases(name: str, out_features: int, in_features: int, device: torch.device, quick: bool) -> Iterator[Case]:
    dtype = torch.bfloat16
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype).requires_grad_(False)
    ours = NF4Linear.from_linear(dense, compute_dtype=dtype)  # quantize_model's defaults: blocksize 64, double quant
    theirs = bnb_twin(nn.Sequential(ours))[0]
    n_dense = cold_copies(_weight_bytes(dense), device, quick)
    n_nf4 = cold_copies(_weight_bytes(ours), device, quick)
    dense_copies = [dense, *(copy.deepcopy(dense) for _ in range(n_dense - 1))]
    ours_copies = [ours, *(copy.deepcopy(ours) for _ in range(n_nf4 - 1))]
    theirs_copies = [theirs, *(copy.deepcopy(theirs) for _ in range(n_nf4 - 1))]
    with torch.no_grad():  # bitsandbytes converts each copy to its inference layout on the first call
        for layer in theirs_copies:
            layer(torch.zeros(1, in_features, device=device, dtype=dtype))
    packed_for_cpu = bool(getattr(theirs.weight.quant_state, "packing_format_for_cpu", False))
    nf4_bytes = _weight_bytes(ours)
    for m in TOKENS:
        x = torch.randn(m, in_features, device=device, dtype=dtype)
        io_bytes = (m * in_features + m * out_features) * x.element_size()

        def roofline(ms: dict[str, float], read_gbps: float, io_bytes=io_bytes) -> dict:
            figures = bandwidth(nf4_bytes + io_bytes, ms["ours"], read_gbps)
            dense_gbps = (_weight_bytes(dense) + io_bytes) / ms["baseline"] / 1e6
            figures["roofline"] += f"; bf16 nn.Linear {dense_gbps:.1f} GB/s"
            return figures

        yield Case(
            op="NF4Linear decode", shape=f"m{m} {in_features}->{out_features}", dtype="bfloat16",
            ours=_round_robin(ours_copies, x), baseline=_round_robin(dense_copies, x), baseline_name="bf16 nn.Linear",
            check=_check_against_reference(ours, {"ours": lambda x=x: ours(x), "bitsandbytes": lambda x=x: theirs(x)},
                                           x),
            roofline=roofline, also={"bnb_linear4bit": _round_robin(theirs_copies, x)}, other_baselines=BNB,
            info={"name": name, "tokens": m, "weight_copies": {"ours": n_nf4, "bf16": n_dense},
                  "bnb_cpu_inference_layout": packed_for_cpu},
        )


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds of one greedy generate() of exactly `new_tokens` tokens after `prompt`."""
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1, use_cache=True,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=model.config.pad_token_id)
    sync()
    seconds = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise JobFailed(f"generate made {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}: tokens/s would "
                        "compare different counts")
    return seconds


def _first_step_check(ours: nn.Module, theirs: nn.Module, prompt: torch.Tensor) -> float:
    """Largest difference of the next-token logits of ours and bitsandbytes' (same NF4 bytes),
    relative to their largest magnitude; JobFailed above 5% (different weights, such as the bf16
    model's, differ by about 30%)."""
    with torch.no_grad():
        want = theirs(prompt).logits[0, -1].float()
        got = ours(prompt).logits[0, -1].float()
    rel = (got - want).abs().max().item() / want.abs().max().item()
    if not rel <= 5e-2:
        raise JobFailed(f"generate: ours' first-step logits differ from bitsandbytes' by {rel:.3g} of their scale "
                        "(same NF4 bytes)")
    return rel


def generate_row(device: torch.device, quick: bool) -> dict:
    """generate() of a random-init Llama at a finetune size preset: quantize_model'd (ours)
    against the same model in bf16 and under bitsandbytes 4-bit. The three run in turn, each
    round in another order, so that a machine whose speed drifts slows all alike; medians."""
    from transformers import AutoModelForCausalLM

    from ..finetune.presets import model_config

    spec = QUICK_GENERATE if quick else GENERATE
    prompt_tokens, new_tokens = spec["prompt_tokens"], spec["new_tokens"]
    torch.manual_seed(0)
    with torch.device(device):
        bf16 = AutoModelForCausalLM.from_config(model_config("llama", spec["size"], prompt_tokens + new_tokens),
                                                dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ours = quantize_model(copy.deepcopy(bf16), progress=False).eval()
    theirs = bnb_twin(ours)
    prompt = torch.randint(0, 256, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    logits_diff = _first_step_check(ours, theirs, prompt)
    models = {"ours": ours, "baseline": bf16, "bnb_4bit": theirs}
    for model in models.values():  # warm-up: first-call work, bitsandbytes' layout conversion
        _generate(model, prompt, new_tokens)
    seconds = {name: [] for name in models}
    for r in range(spec["rounds"]):
        names = list(models)[r % 3:] + list(models)[:r % 3]
        for name in names:
            seconds[name].append(_generate(models[name], prompt, new_tokens))
    ms = {name: 1e3 * sorted(s)[len(s) // 2] for name, s in seconds.items()}
    tokens_per_s = {name: round(new_tokens / (v / 1e3), 2) for name, v in ms.items()}
    n_params = sum(p.numel() for p in bf16.parameters())
    return {
        "op": "generate greedy", "shape": f"llama {spec['size']} b1 prompt{prompt_tokens} +{new_tokens}",
        "dtype": "bfloat16", "ours_ms": round(ms["ours"], 4), "baseline": "same model in bf16",
        "baseline_ms": round(ms["baseline"], 4), "ratio": round(ms["baseline"] / ms["ours"], 3),
        "bnb_4bit_ms": round(ms["bnb_4bit"], 4),
        **other_baseline_ratios({"bnb_4bit": "bitsandbytes 4-bit, same NF4 bytes"}, ms),
        "tokens_per_s": tokens_per_s, "new_tokens": new_tokens, "rounds": spec["rounds"], "parameters": n_params,
        "first_step_logits_rel_diff_vs_bnb": round(logits_diff, 5),
        "roofline": (f"{tokens_per_s['ours']:.1f} tokens/s (bf16 {tokens_per_s['baseline']:.1f}, bitsandbytes "
                     f"{tokens_per_s['bnb_4bit']:.1f}); prefill included"),
    }
