"""Fused LoRA linear ops: forward (y, xa) and backward (dx, dA, dB, dbias), with autograd.

y = x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ on 2-D x [M, K]; W is dense (`weight`) or NF4
(`NF4Weight.op_args()`: `packed`, `absmax`, the double-quant tensors, `blocksize`, ...; every
implementation rebuilds it with `nf4_base`, which checks it). The dropout keep mask
is drawn from `seed` (a 1-element int64 CPU tensor, so tracing never reads it) by each
backend and drawn again in backward, never stored; xa = dropout(x)·Aᵀ [M, r] (fp32) is
returned and saved for dB. No gradient flows to W.
The default implementation is `reference.lora` (it materializes W; backends/ register the
tiled CPU path and the Triton kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nf4_weight import NF4Weight
from ..reference import lora as ref


def keep_mask_cpu(seed: int, dropout_p: float, M: int, K: int, device) -> Tensor:
    """The keep mask of the CPU and reference paths (reference.lora.dropout_keep_mask)."""
    return ref.dropout_keep_mask(seed, dropout_p, (M, K)).to(device)


def nf4_base(weight, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
             out_features, in_features, dtype) -> NF4Weight | None:
    """The op's base weight arguments back as an `NF4Weight` (checked), or None for a dense
    `weight`; every implementation of the LoRA ops starts here."""
    if (weight is None) == (packed is None):
        raise ValueError("pass exactly one of weight (dense) and packed (NF4)")
    if weight is not None:
        if weight.dim() != 2 or tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight must be [{out_features}, {in_features}], got {tuple(weight.shape)}")
        return None
    return NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                  (out_features, in_features), dtype)


def _dense(weight, nf4: NF4Weight | None, dtype) -> Tensor:
    return weight if nf4 is None else nf4.dequantize_reference(dtype)


@torch.library.custom_op("qlora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor, weight: Tensor | None, packed: Tensor | None, absmax: Tensor | None, nested_absmax: Tensor | None,
    nested_code: Tensor | None, offset: Tensor | None, blocksize: int, nested_blocksize: int, out_features: int,
    bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor,
) -> tuple[Tensor, Tensor]:
    M, K = x.shape
    W = _dense(weight, nf4_base(weight, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                nested_blocksize, out_features, K, x.dtype), x.dtype)
    keep = keep_mask_cpu(int(seed), dropout_p, M, K, x.device) if dropout_p > 0 else None
    y = ref.lora_linear(x, W, bias, lora_A, lora_B, scaling, keep, dropout_p)
    dropped = x if keep is None else x * keep / (1.0 - dropout_p)
    xa = dropped.float() @ lora_A.float().t()
    return y, xa


@lora_linear_fwd.register_fake
def _(x, weight, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
      bias, lora_A, lora_B, scaling, dropout_p, seed):
    nf4_base(weight, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
             x.shape[1], x.dtype)
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qlora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, packed: Tensor | None, absmax: Tensor | None,
    nested_absmax: Tensor | None, nested_code: Tensor | None, offset: Tensor | None, blocksize: int,
    nested_blocksize: int, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor, xa: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, K = x.shape
    W = _dense(weight, nf4_base(weight, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                nested_blocksize, dy.shape[1], K, x.dtype), x.dtype).float()
    keep = keep_mask_cpu(int(seed), dropout_p, M, K, x.device) if dropout_p > 0 else None
    dyf, xf, A, B = dy.float(), x.float(), lora_A.float(), lora_B.float()
    dyb = dyf @ B
    dlow = scaling * (dyb @ A)
    if keep is not None:
        dlow = dlow * keep / (1.0 - dropout_p)
    dropped = xf if keep is None else xf * keep / (1.0 - dropout_p)
    dx = dyf @ W + dlow
    dA = scaling * dyb.t() @ dropped
    dB = scaling * dyf.t() @ xa.float()
    return dx.to(x.dtype), dA.to(lora_A.dtype), dB.to(lora_B.dtype), dyf.sum(0).to(dy.dtype)


@lora_linear_bwd.register_fake
def _(dy, x, weight, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, lora_A,
      lora_B, scaling, dropout_p, seed, xa):
    nf4_base(weight, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, dy.shape[1],
             x.shape[1], x.dtype)
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B), dy.new_empty((dy.shape[1],))


def _setup_context(ctx, inputs, output):
    (x, weight, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
     bias, lora_A, lora_B, scaling, dropout_p, seed) = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, xa, seed)
    ctx.blocksize, ctx.nested_blocksize = blocksize, nested_blocksize
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, dxa):
    x, weight, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, xa, seed = ctx.saved_tensors
    dx, dA, dB, dbias = lora_linear_bwd(
        dy.contiguous(), x, weight, packed, absmax, nested_absmax, nested_code, offset, ctx.blocksize,
        ctx.nested_blocksize, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, xa,
    )
    dbias = None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype)
    return dx, None, None, None, None, None, None, None, None, None, dbias, dA, dB, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
