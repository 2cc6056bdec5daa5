"""The gated MLP activation of Llama-family models: `act(gate) * up`.

`activation` is "silu" (Llama, Mistral, Qwen2/3, Phi-3: transformers' `silu` / `swish`) or
"gelu_tanh" (Gemma's `gelu_pytorch_tanh`: `F.gelu(x, approximate="tanh")`). Rounding is
transformers' own: the activation is computed (in fp32 inside PyTorch's kernel) and rounded to
the inputs' dtype, then multiplied by `up`, the product rounded again. Both kernels keep that
first rounding, so a patched model's forward differs from stock only by the activation's last
bits. Phi-3 packs the two as one `gate_up` tensor, gate first (`swiglu_packed`).

The backward is autograd's through these expressions; the kernels recompute the activation in
fp32 instead of reading a saved one: with a = act(gate) rounded to the dtype as in the forward,
d_up = d_out * a and d_gate = d_out * up * act'(gate), each rounded once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")

# gelu_tanh(x) = x * sigmoid(2 * sqrt(2 / pi) * (x + 0.044715 x^3)) = 0.5 x (1 + tanh(...)):
# the kernels use the sigmoid form (no cancellation where tanh -> -1)
GELU_TANH_K = 2.0 * math.sqrt(2.0 / math.pi)
GELU_TANH_C = 0.044715


def activate(gate: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) in gate's dtype, as transformers' activation modules compute it."""
    if activation == "silu":
        return F.silu(gate)
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def swiglu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up in the inputs' dtype (act rounded to the dtype, then the product)."""
    return activate(gate, activation) * up


def swiglu_packed(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Phi-3's layout: gate_up [..., 2 * I], gate the first half, up the second."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up, activation)


def activation_and_derivative(gate32: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(g), act'(g)) in fp32 from fp32 g: g * s(z) and s + g * s (1 - s) z' with s = sigmoid(z),
    z = g (silu) or K (g + C g^3) (gelu_tanh). The kernels' formulas, here for the tests."""
    if activation == "silu":
        z, dz = gate32, torch.ones_like(gate32)
    elif activation == "gelu_tanh":
        z = GELU_TANH_K * (gate32 + GELU_TANH_C * gate32 ** 3)
        dz = GELU_TANH_K * (1.0 + 3.0 * GELU_TANH_C * gate32 ** 2)
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    s = torch.sigmoid(z)
    return gate32 * s, s + gate32 * s * (1.0 - s) * dz


def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up) as the kernels compute them: fp32 from the inputs, each rounded once to
    the dtype; `a` in d_up is act(gate) rounded to the dtype, the factor the forward used."""
    g = gate.float()
    a, da = activation_and_derivative(g, activation)
    a = a.to(gate.dtype).float()
    d = dout.float()
    return (d * up.float() * da).to(gate.dtype), (d * a).to(up.dtype)
