"""Flash attention ops: forward (out, lse) and backward (dq, dk, dv), with autograd.

Default implementations are `reference.attention` (S x S, for tests and devices without a
kernel); backends/ registers the tiled C++ (CPU) and Triton (CUDA) kernels.
Conventions (layouts, GQA, bottom-right causal, ALiBi, padding, varlen) are documented in
`reference/attention.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import attention as ref


def _reference_forward(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens):
    if cu_seqlens is not None:
        return ref.flash_attention_varlen(q, k, v, cu_seqlens, causal, softmax_scale, alibi_slopes)
    return ref.flash_attention(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask)


@torch.library.custom_op("qlora_kernels::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, alibi_slopes: Tensor | None,
    key_padding_mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int,
) -> tuple[Tensor, Tensor]:
    out, lse = _reference_forward(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens)
    return out.contiguous(), lse.float().contiguous()


@flash_attention_fwd.register_fake
def _(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen):
    if cu_seqlens is not None:  # [T, H, D]
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
            (q.shape[1], q.shape[0]), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("qlora_kernels::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, softmax_scale: float,
    alibi_slopes: Tensor | None, key_padding_mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int,
) -> tuple[Tensor, Tensor, Tensor]:
    if cu_seqlens is not None:
        grads = ref.flash_attention_varlen_backward(dout, q, k, v, cu_seqlens, causal, softmax_scale, alibi_slopes)
    else:
        grads = ref.flash_attention_backward(dout, q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask)
    return grads_like_inputs((q, k, v), grads)


def grads_like_inputs(inputs, grads):
    """Gradients with their input's strides (a transposed view's gradient needs no copy
    downstream); every implementation returns this layout, as the fake does."""
    out = []
    for t, g in zip(inputs, grads):
        out.append(g if g.stride() == t.stride() else torch.empty_like(t).copy_(g))
    return tuple(out)


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen):
    return tuple(torch.empty_like(t) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, key_padding_mask, cu_seqlens)
    ctx.causal, ctx.softmax_scale, ctx.max_seqlen = causal, softmax_scale, max_seqlen


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes, key_padding_mask, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(
        dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.softmax_scale, alibi_slopes, key_padding_mask,
        cu_seqlens, ctx.max_seqlen,
    )
    return dq, dk, dv, None, None, None, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
