"""`qlora_kernels.swiglu` / `swiglu_packed`: the gated MLP activation act(gate) * up, fwd and bwd."""

from __future__ import annotations

import torch

from .ops import swiglu as ops


def swiglu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up, as transformers' gated MLPs compute it (act rounded to the dtype, then
    the product), in one pass forward and one backward.

    activation: "silu" (Llama, Mistral, Qwen2/3, Phi-3) or "gelu_tanh" (Gemma's
    gelu_pytorch_tanh). gate and up: one shape, float32 / float16 / bfloat16, one device; any
    strides (views whose leading dims flatten to one row stride, such as a half of a wider
    tensor, are read in place). Returns a new contiguous tensor of gate's shape. Only gate and
    up are kept for the backward, which recomputes the activation in fp32; gradients flow to
    both.
    """
    ops.check_args(gate, up, activation)  # before the dispatcher, which has its own words for a non-tensor
    return ops.swiglu_fwd(gate, up, activation)


def swiglu_packed(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """swiglu(gate, up) of Phi-3's packed gate_up [..., 2 * I] (gate the first half), read in
    place; its gradient comes back as one [..., 2 * I] tensor. Returns [..., I]."""
    ops.check_packed_args(gate_up, activation)
    return ops.swiglu_packed_fwd(gate_up, activation)
