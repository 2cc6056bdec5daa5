"""Rotary embedding op: q and k rotated together by one kernel launch, with autograd.

    qlora_kernels::rope(q, k, cos, sin, backward) -> (q_out, k_out)

q [B, Hq, S, D] and k [B, Hk, S, D] (any strides: transformers' `.transpose(1, 2)` views are
read in place), cos / sin [B or 1, S, rotary_dim] (any strides; a broadcast batch is one row
or stride 0), rotary_dim even and <= D; the columns from rotary_dim on pass through (Phi-3's
partial rotary). `backward` applies the transposed rotation, which is the gradient: the
autograd of the op is the op itself with `backward` flipped, so nothing but cos and sin is
saved for the backward. Meaning: `reference.rope.rotate` (fp32 math, one rounding); the default
implementation calls it. Outputs take their input's strides where the head dim is unit-stride
(`out_like`), so the attention after the rotation reads them as it would have read q and k.

cos and sin are not differentiated (transformers computes them from a buffer under no_grad);
`qlora_kernels.apply_rotary` sends cos / sin that require grad to the reference instead.

`check_args` is the one validator: the default implementation, the fake implementation and
every backend run it first, and the kernels trust what it let through.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import require
from ..reference import rope as ref

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_args(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> None:
    """Raise ValueError / TypeError naming the argument unless the kernels can take these."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; rotary embeddings take float16, bfloat16 or float32")
    if not isinstance(backward, bool):
        raise TypeError(f"backward must be a bool, got {type(backward).__name__}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if cos.dtype != sin.dtype:
        raise ValueError(f"cos and sin must share a dtype, got {cos.dtype} and {sin.dtype}")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError(f"q, k, cos, sin must be on one device, got {q.device}, {k.device}, {cos.device}, "
                         f"{sin.device}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [batch, heads, seq, head_dim], got shapes {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    B, S, D = q.shape[0], q.shape[2], q.shape[3]
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, S, D):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, seq and head_dim")
    if cos.dim() != 3 or cos.shape != sin.shape:
        raise ValueError(f"cos and sin must be [batch or 1, seq, rotary_dim] of one shape, got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    rotary_dim = cos.shape[-1]
    require(cos.shape[0] == B or cos.shape[0] == 1,
            f"cos / sin batch ({cos.shape[0]}) must be q's batch ({B}) or 1")
    require(cos.shape[1] == S, f"cos / sin have {cos.shape[1]} positions, q and k {S}")
    require(rotary_dim % 2 == 0 and 2 <= rotary_dim,
            f"rotary_dim (cos.shape[-1]) must be even and >= 2, got {rotary_dim}")
    require(rotary_dim <= D, f"rotary_dim (cos.shape[-1] = {rotary_dim}) exceeds head_dim ({D})")


def out_like(t: Tensor) -> Tensor:
    """The output for input t: t's strides when they are dense with a unit-stride head dim
    (empty_like keeps them), else contiguous."""
    out = torch.empty_like(t)
    return out if out.stride(-1) == 1 or out.shape[-1] == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


@torch.library.custom_op("qlora_kernels::rope", mutates_args=())
def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    check_args(q, k, cos, sin, backward)
    q_out, k_out = ref.apply_rotary_fp32(q, k, cos, sin, backward)
    return out_like(q).copy_(q_out), out_like(k).copy_(k_out)


@rope.register_fake
def _(q, k, cos, sin, backward):
    check_args(q, k, cos, sin, backward)
    return out_like(q), out_like(k)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = rope(dq_out, dk_out, cos, sin, not ctx.backward)
    return dq, dk, None, None, None


rope.register_autograd(_backward, setup_context=_setup_context)
