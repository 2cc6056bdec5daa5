"""RMSNorm ops: forward (y, rstd) and backward (dx, dweight), with autograd.

The meaning (both roundings of transformers, `offset`, the output dtype) is
`reference/norm.py`, which is also the default implementation; backends/ registers the C++
(CPU) and Triton (CUDA) kernels.

- `rms_norm_fwd(x [..., H], weight [H], eps, offset, cast_before_weight)` -> y [..., H]
  (contiguous, `reference.norm.output_dtype`) and rstd [...] fp32 (fp64 for fp64 x), one
  value per row.
- `rms_norm_bwd(dy, x, weight, rstd, offset, cast_before_weight, weight_grad)` -> dx (x's
  shape and dtype) and dweight (weight's dtype; an empty tensor when `weight_grad` is False).

The autograd saves x, weight and rstd, never the normalized rows; the backward is one pass
over dy and x. `check_args` / `check_backward_args` validate the arguments for every
implementation and for the fake one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import require
from ..reference import norm as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_args(x: Tensor, weight: Tensor, eps: float, offset: float) -> None:
    """Raise TypeError / ValueError naming the argument unless the kernels can take these."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; rms_norm takes float32, float16, bfloat16 or float64")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the normalized one, last)")
    if weight.dim() != 1:
        raise ValueError(f"weight must be 1-D [hidden], got shape {list(weight.shape)}")
    require(weight.shape[0] == x.shape[-1],
            f"weight has {weight.shape[0]} elements, x's last dimension is {x.shape[-1]}: they must match")
    require(x.shape[-1] >= 1, "x's last dimension (the normalized one) must not be empty")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}: they must be on one device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number, got {offset!r}")


def check_backward_args(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float,
                        cast_before_weight: bool) -> None:
    """check_args on x and weight, and dy like the forward's y, rstd like its rstd."""
    check_args(x, weight, 0.0, offset)
    y_dtype = ref.output_dtype(x.dtype, weight.dtype, cast_before_weight)
    if not isinstance(dy, Tensor) or tuple(dy.shape) != tuple(x.shape) or dy.dtype != y_dtype or dy.device != x.device:
        raise ValueError(f"dy must be the forward output's gradient: {list(x.shape)} {y_dtype} on {x.device}, got "
                         f"{getattr(dy, 'dtype', type(dy).__name__)} {list(getattr(dy, 'shape', []))}")
    rstd_dtype = ref.compute_dtype(x.dtype)
    if (not isinstance(rstd, Tensor) or tuple(rstd.shape) != tuple(x.shape[:-1]) or rstd.dtype != rstd_dtype
            or rstd.device != x.device):
        raise ValueError(f"rstd must be the forward's {rstd_dtype} {list(x.shape[:-1])} tensor on {x.device}, got "
                         f"{getattr(rstd, 'dtype', type(rstd).__name__)} {list(getattr(rstd, 'shape', []))}")


def rows_2d(t: Tensor) -> Tensor:
    """t [..., H] as a [rows, H] matrix the kernels read in place (unit stride along H, one row
    stride), copied only when no such view exists."""
    H = t.shape[-1]
    if t.dim() == 2 and t.stride(1) == 1:
        return t
    flat = t.reshape(-1, H)
    return flat if flat.stride(1) == 1 or H == 1 else flat.contiguous()


def empty_dweight(weight: Tensor) -> Tensor:
    """The backward's dweight output when the weight gets no gradient."""
    return weight.new_empty((0,))


@torch.library.custom_op("qlora_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, offset: float,
                 cast_before_weight: bool) -> tuple[Tensor, Tensor]:
    check_args(x, weight, eps, offset)
    y, rstd = ref.rms_norm_forward(x, weight, eps, offset, cast_before_weight)
    return y.contiguous(), rstd.contiguous()


@rms_norm_fwd.register_fake
def _(x, weight, eps, offset, cast_before_weight):
    check_args(x, weight, eps, offset)
    y_dtype = ref.output_dtype(x.dtype, weight.dtype, cast_before_weight)
    return x.new_empty(x.shape, dtype=y_dtype), x.new_empty(x.shape[:-1], dtype=ref.compute_dtype(x.dtype))


@torch.library.custom_op("qlora_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float, cast_before_weight: bool,
                 weight_grad: bool) -> tuple[Tensor, Tensor]:
    check_backward_args(dy, x, weight, rstd, offset, cast_before_weight)
    dx, dweight = ref.rms_norm_backward(dy, x, weight, rstd, offset, cast_before_weight, weight_grad)
    return dx.contiguous(), empty_dweight(weight) if dweight is None else dweight


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, offset, cast_before_weight, weight_grad):
    check_backward_args(dy, x, weight, rstd, offset, cast_before_weight)
    return x.new_empty(x.shape), weight.new_empty(weight.shape if weight_grad else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, cast_before_weight = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset, ctx.cast_before_weight = offset, cast_before_weight
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, drstd):
    x, weight, rstd = ctx.saved_tensors
    if dy is None:  # only rstd was used downstream: it is a statistic, not differentiated
        return None, None, None, None, None
    weight_grad = ctx.needs_input_grad[1]
    dx, dweight = rms_norm_bwd(dy.contiguous(), x, weight, rstd, ctx.offset, ctx.cast_before_weight, weight_grad)
    return (dx if ctx.needs_input_grad[0] else None, dweight if weight_grad else None, None, None, None)


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
