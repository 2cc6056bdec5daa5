"""Fused linear + cross-entropy: ours against the loss a transformers *ForCausalLM computes
(its lm_head, then `ForCausalLMLoss`, which upcasts the logits to fp32), as a training step:
forward and backward, the lm_head frozen (QLoRA) or trainable. Each row also holds the peak
memory of that step, ours and stock: the point of the fused op is that the [tokens, vocab]
logits and their gradient are never in memory (CUDA: the allocator's peak; CPU: a fresh
process's peak RSS, bench/memory.py).

One set of statements builds the tensors and states both sides: the timed lambdas evaluate
them in this process and the CPU peak runs them in a fresh one, so both measure the same."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .case import Case, close_check

# Llama-2-7B's lm_head over 4 sequences of 2048 tokens: 262 MB of fp32 logits per sequence
SHAPE = dict(batch=4, seq=2048, vocab=32000, hidden=4096)
QUICK_SHAPE = dict(batch=2, seq=64, vocab=1000, hidden=64)
RTOL = 1e-4  # fp32 both sides; only the order of the sums differs

SETUP = """\
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss
g = torch.Generator().manual_seed(0)
hidden = torch.randn({batch}, {seq}, {hidden}, generator=g).to('{device}').requires_grad_()
weight = (torch.randn({vocab}, {hidden}, generator=g) * {hidden} ** -0.5).to('{device}').requires_grad_({trainable})
labels = torch.randint(0, {vocab}, ({batch}, {seq}), generator=g).to('{device}')
labels[:, :{seq} // 8] = -100  # a prompt that is not trained on
# what the model's forward does before its loss: tokens < n predict n
shifted = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
"""
STOCK = "ForCausalLMLoss(F.linear(hidden, weight), labels, weight.shape[0])"
OURS = "qk.fused_linear_cross_entropy(hidden.view(-1, hidden.shape[-1]), weight, shifted)"


def cases(device: torch.device, quick: bool) -> Iterator[Case]:
    shape = QUICK_SHAPE if quick else SHAPE
    for trainable in (False, True):
        yield _case(device, shape, trainable)


def _training_step(expr: str, grad_of: str) -> str:
    return f"({expr}).backward()\n" + "".join(f"{name}.grad = None\n" for name in grad_of)


def _case(device: torch.device, shape: dict, trainable: bool) -> Case:
    import qlora_kernels

    setup = SETUP.format(device=device, trainable=trainable, **shape)
    ns = {"torch": torch, "qk": qlora_kernels}
    exec(setup, ns)
    grad_of = [ns["hidden"], ns["weight"]] if trainable else [ns["hidden"]]
    names = ("hidden", "weight") if trainable else ("hidden",)
    stock_code, ours_code = compile(STOCK, "stock", "eval"), compile(OURS, "ours", "eval")
    stock = lambda: eval(stock_code, ns)  # noqa: E731
    ours = lambda: eval(ours_code, ns)  # noqa: E731
    step_code = {side: compile(_training_step(expr, names), side, "exec") for side, expr in (("ours", OURS),
                                                                                             ("stock", STOCK))}
    tokens, vocab, hidden = shape["batch"] * shape["seq"], shape["vocab"], shape["hidden"]
    # matmuls: logits, the hidden states' gradient, the weight's gradient when it trains
    flops = 2 * tokens * vocab * hidden * (3 if trainable else 2)

    def roofline(ms: dict[str, float], read_gbps: float) -> dict:
        tflops = flops / ms["ours"] / 1e9
        return {"roofline": f"{tflops:.3f} TFLOP/s", "TFLOPs": round(tflops, 4)}

    return Case(
        op="linear + cross-entropy fwd+bwd" + (", lm_head trainable" if trainable else ""),
        shape=f"{shape['batch']}x{shape['seq']} tokens, V{vocab}, H{hidden}", dtype="float32",
        ours=lambda: exec(step_code["ours"], ns), baseline=lambda: exec(step_code["stock"], ns),
        baseline_name="lm_head + transformers ForCausalLMLoss",
        check=close_check(ours, stock, grad_of, grad_of, rtol=RTOL), roofline=roofline,
        info={"tokens": tokens, "vocab": vocab, "hidden": hidden, "lm_head": "trainable" if trainable else "frozen"},
        peak_memory=True, cpu_peak=(setup, _training_step(OURS, names), _training_step(STOCK, names)),
    )
