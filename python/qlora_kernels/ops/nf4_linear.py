"""The frozen NF4 linear layer's ops (`NF4Linear.forward`): forward and input gradient, with autograd.

y = x·Wᵀ + bias on 2-D x [M, K] with W [N, K] NF4 (`NF4Weight.op_args()`, rebuilt and checked
by `nf4_weight` in every implementation); W's values are `reference.nf4_dequantize(...,
dtype=x.dtype)`, as in the LoRA ops. The backward op gives dx = dy·W; dbias = Σ_m dy is taken
in the autograd formula; no gradient flows to W.
The default implementation is the reference (dequantize W, then `F.linear`); backends/
register the GEMV (M <= 16) and the tiled or dequantize-once paths above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import is_fake
from ..nf4_weight import NF4Weight

# Inference without the op's dispatch, by device type (backends/ register them): fn(x, weight,
# bias) -> y, or None where that backend has no direct path for these inputs. A decode step runs
# many small layers, and for them the dispatch of a custom op plus a second check of a state the
# layer has already checked cost more than the GEMV itself.
DIRECT_INFERENCE: dict[str, Callable[[Tensor, NF4Weight, Tensor | None], Tensor | None]] = {}


def direct_inference(x: Tensor, weight: NF4Weight, bias: Tensor | None) -> Tensor | None:
    """y = x·Wᵀ + bias from the device's direct path, or None where the op must run: a gradient
    is wanted, something traces or intercepts the call (torch.compile, FakeTensors, a dispatch
    mode such as a FLOP counter), or the backend's direct path does not apply. The direct paths
    call the op's own kernels, so both give the same bits."""
    direct = DIRECT_INFERENCE.get(x.device.type)
    if direct is None or torch.compiler.is_compiling() or is_fake(x) or torch._C._len_torch_dispatch_stack():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    return direct(x, weight, bias)


def nf4_weight(x, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
               in_features) -> NF4Weight:
    """The op's NF4 arguments back as an `NF4Weight` [out_features, in_features], checked, and
    x (or dy) and bias checked against it; every implementation starts here."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be 2-D fp32/fp16/bf16, got {tuple(x.shape)} {x.dtype}")
    w = NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                               (out_features, in_features), x.dtype)
    if x.device != w.device:
        raise ValueError(f"x is on {x.device}, the NF4 weight on {w.device}")
    if bias is not None and (tuple(bias.shape) != (out_features,) or bias.device != w.device):
        raise ValueError(f"bias must be [{out_features}] on {w.device}, got {tuple(bias.shape)} on {bias.device}")
    return w


@torch.library.custom_op("qlora_kernels::nf4_linear", mutates_args=())
def nf4_linear(
    x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, blocksize: int, nested_blocksize: int, out_features: int, bias: Tensor | None,
) -> Tensor:
    w = nf4_weight(x, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                   out_features, x.shape[1])
    return torch.nn.functional.linear(x, w.dequantize_reference(x.dtype), None if bias is None else bias.to(x.dtype))


@nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features, bias):
    nf4_weight(x, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
               x.shape[1])
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("qlora_kernels::nf4_linear_bwd", mutates_args=())
def nf4_linear_bwd(
    dy: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, blocksize: int, nested_blocksize: int, in_features: int,
) -> Tensor:
    """dx = dy·W [M, in_features] in dy's dtype."""
    w = nf4_weight(dy, None, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                   dy.shape[1], in_features)
    return dy @ w.dequantize_reference(dy.dtype)


@nf4_linear_bwd.register_fake
def _(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, in_features):
    nf4_weight(dy, None, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, dy.shape[1],
               in_features)
    return dy.new_empty((dy.shape[0], in_features))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, _, bias = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
    ctx.blocksize, ctx.nested_blocksize, ctx.in_features = blocksize, nested_blocksize, x.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        dx = nf4_linear_bwd(dy.contiguous(), packed, absmax, nested_absmax, nested_code, offset, ctx.blocksize,
                            ctx.nested_blocksize, ctx.in_features)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[9]:
        dbias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, None, None, None, None, None, None, None, None, dbias


nf4_linear.register_autograd(_backward, setup_context=_setup_context)
