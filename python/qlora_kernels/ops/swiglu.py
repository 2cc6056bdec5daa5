"""SwiGLU ops: `act(gate) * up` forward and backward, with autograd (reference/swiglu.py).

Two layouts: `swiglu_fwd` / `swiglu_bwd` take gate and up as two tensors of one shape (any
strides; a view such as one half of a wider tensor is read in place by the kernels, which
need only a unit stride along the last dim and leading dims that flatten to one row stride);
`swiglu_packed_fwd` / `swiglu_packed_bwd` take Phi-3's `gate_up` [..., 2 * I] (gate the first
half) and give the packed gradient [..., 2 * I] directly, so its backward writes one buffer
instead of two halves that autograd would then concatenate.

The forward saves only its inputs (gate and up, or gate_up), never act(gate) or the product:
the backward recomputes the activation in fp32 and gives both gradients in one pass.
`check_args` / `check_packed_args` are the validators: the default (reference)
implementations, the fake implementations and every backend run them first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import require
from ..reference import swiglu as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ref.ACTIVATIONS


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the features), got a 0-d tensor")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} (gelu_tanh is transformers' "
                         f"gelu_pytorch_tanh), got {activation!r}")


def check_args(gate: Tensor, up: Tensor, activation: str, dout: Tensor | None = None) -> None:
    """Raise TypeError / ValueError naming the argument unless the kernels can take these."""
    check_activation(activation)
    named = [("gate", gate), ("up", up)] + ([("dout", dout)] if dout is not None else [])
    for name, t in named:
        _check_tensor(name, t)
    for name, t in named[1:]:
        require(t.shape == gate.shape, f"{name} must have gate's shape {list(gate.shape)}, got {list(t.shape)}")
        if t.dtype != gate.dtype:
            raise ValueError(f"{name} must have gate's dtype {gate.dtype}, got {t.dtype}")
        if t.device != gate.device:
            raise ValueError(f"{name} must be on gate's device {gate.device}, got {t.device}")


def check_packed_args(gate_up: Tensor, activation: str, dout: Tensor | None = None) -> None:
    check_activation(activation)
    _check_tensor("gate_up", gate_up)
    require(gate_up.shape[-1] % 2 == 0, f"gate_up's last dim holds gate then up and must be even, got "
                                        f"{gate_up.shape[-1]}")
    if dout is not None:
        _check_tensor("dout", dout)
        half = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
        require(dout.shape == half, f"dout must be {list(half)} (gate_up's shape with half its last dim), got "
                                    f"{list(dout.shape)}")
        if dout.dtype != gate_up.dtype or dout.device != gate_up.device:
            raise ValueError(f"dout must be {gate_up.dtype} on {gate_up.device}, got {dout.dtype} on {dout.device}")


def halves(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    """(gate, up): views of the two halves of gate_up's last dim."""
    return gate_up.chunk(2, dim=-1)


@torch.library.custom_op("qlora_kernels::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    check_args(gate, up, activation)
    return ref.swiglu(gate, up, activation).contiguous()


@swiglu_fwd.register_fake
def _(gate, up, activation):
    check_args(gate, up, activation)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("qlora_kernels::swiglu_bwd", mutates_args=())
def swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    check_args(gate, up, activation, dout)
    dgate, dup = ref.swiglu_backward(dout, gate, up, activation)
    return dgate.contiguous(), dup.contiguous()


@swiglu_bwd.register_fake
def _(dout, gate, up, activation):
    check_args(gate, up, activation, dout)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@torch.library.custom_op("qlora_kernels::swiglu_packed_fwd", mutates_args=())
def swiglu_packed_fwd(gate_up: Tensor, activation: str) -> Tensor:
    check_packed_args(gate_up, activation)
    return ref.swiglu_packed(gate_up, activation).contiguous()


@swiglu_packed_fwd.register_fake
def _(gate_up, activation):
    check_packed_args(gate_up, activation)
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("qlora_kernels::swiglu_packed_bwd", mutates_args=())
def swiglu_packed_bwd(dout: Tensor, gate_up: Tensor, activation: str) -> Tensor:
    check_packed_args(gate_up, activation, dout)
    return torch.cat(ref.swiglu_backward(dout, *halves(gate_up), activation), dim=-1)


@swiglu_packed_bwd.register_fake
def _(dout, gate_up, activation):
    check_packed_args(gate_up, activation, dout)
    return gate_up.new_empty(gate_up.shape)


def _setup_context(ctx, inputs, output):
    *tensors, activation = inputs
    ctx.save_for_backward(*tensors)  # gate and up (or gate_up): nothing computed is kept
    ctx.activation = activation


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = swiglu_bwd(dout, gate, up, ctx.activation)
    return dgate, dup, None


def _packed_backward(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    return swiglu_packed_bwd(dout, gate_up, ctx.activation), None


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)
swiglu_packed_fwd.register_autograd(_packed_backward, setup_context=_setup_context)
