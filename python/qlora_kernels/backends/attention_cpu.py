"""CPU flash attention: the C++ kernels of csrc/attention_cpu.cpp, through qlora_kernels._C.

Plain functions (op registration lives in cpu.py) with the semantics of reference/attention.py;
they trust their arguments, which ops.attention.check_args has validated.
Dense layout: q [B, Hq, Sq, D], k / v [B, Hkv, Sk, D] with any strides (HF's `.transpose(1, 2)`
views are read in place), lse [B, Hq, Sq]. Varlen layout (cu_seqlens given): q / k / v [T, H, D],
lse [Hq, T]. out and lse (fp32) are contiguous; dq / dk / dv keep their input's strides.
"""

from __future__ import annotations

import math

import torch

from .._native import native, native_error
from ..ops.attention import bhm_strides, lse_shape, lse_strides
from .common import dtype_tag


def _native():
    mod = native()
    if mod is None:
        raise RuntimeError(f"qlora_kernels: the native module _C is not built ({native_error()})")
    return mod


def _unit_stride_head_dim(t: torch.Tensor) -> torch.Tensor:
    # the kernels only need head_dim unit-stride; any other stride is passed through
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    # t's strides, so a transposed view's gradient needs no copy (ops.attention.grads_like_inputs),
    # unless head_dim would not be unit-stride
    g = torch.empty_like(t)
    return g if g.stride(-1) == 1 or g.size(-1) == 1 else torch.empty(t.shape, dtype=t.dtype)


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _launch_args(q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, cu_seqlens_k,
                 window_left, window_right, softcap, sinks):
    """Keyword arguments shared by the forward and backward bindings. The tensors behind the side
    inputs' addresses must outlive the call: callers keep them (see _side_inputs)."""
    varlen = cu_seqlens is not None
    if varlen:
        batch, (seqlen_q, heads_q, head_dim), (seqlen_k, heads_kv) = cu_seqlens.numel() - 1, q.shape, k.shape[:2]
    else:
        (batch, heads_q, seqlen_q, head_dim), (heads_kv, seqlen_k) = q.shape, k.shape[1:3]
    return dict(
        q=q.data_ptr(), q_strides=bhm_strides(q, varlen), k=k.data_ptr(), k_strides=bhm_strides(k, varlen),
        v=v.data_ptr(), v_strides=bhm_strides(v, varlen), out=out.data_ptr(), out_strides=bhm_strides(out, varlen),
        lse=lse.data_ptr(), lse_strides=lse_strides(lse, varlen), dtype=dtype_tag(q.dtype), batch=batch,
        heads_q=heads_q, heads_kv=heads_kv, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim,
        softmax_scale=softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim),
        causal=bool(causal), window_left=int(window_left), window_right=int(window_right), softcap=float(softcap),
        alibi_slopes=_ptr(alibi_slopes), sinks=_ptr(sinks), key_padding_mask=_ptr(key_padding_mask),
        cu_seqlens=_ptr(cu_seqlens), cu_seqlens_k=_ptr(cu_seqlens_k), num_threads=torch.get_num_threads(),
    )


def _side_inputs(alibi_slopes, sinks, key_padding_mask, cu_seqlens, cu_seqlens_k):
    """The kernels' formats: fp32 slopes and sinks, uint8 mask (1 = attend), int32 offsets;
    contiguous (ops.attention.check_args has checked dtypes, shapes and devices)."""
    alibi_slopes, sinks = (t.detach().to(torch.float32).contiguous() if t is not None else None
                           for t in (alibi_slopes, sinks))
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(torch.uint8).contiguous()
    cu_seqlens, cu_seqlens_k = (t.contiguous() if t is not None else None for t in (cu_seqlens, cu_seqlens_k))
    return alibi_slopes, sinks, key_padding_mask, cu_seqlens, cu_seqlens_k


def flash_attention_fwd_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, contiguous; lse fp32 [B, Hq, Sq] or varlen [Hq, Tq]).

    The arguments are those of ops.attention.flash_attention_fwd, already validated by its
    check_args. max_seqlen / max_seqlen_k are accepted for parity with the CUDA kernels; the CPU
    kernel reads the lengths from the offsets.
    """
    q, k, v = (_unit_stride_head_dim(t) for t in (q, k, v))
    side = _side_inputs(alibi_slopes, sinks, key_padding_mask, cu_seqlens, cu_seqlens_k)
    alibi_slopes, sinks, key_padding_mask, cu_seqlens, cu_seqlens_k = side
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(lse_shape(q, cu_seqlens is not None), dtype=torch.float32)
    _native().flash_attention_fwd_cpu(**_launch_args(
        q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, cu_seqlens_k,
        window_left, window_right, softcap, sinks))
    return out, lse


def flash_attention_bwd_cpu(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dsinks): gradients in q's dtype, strided like q, k, v; dsinks fp32 [Hq], None
    without sinks. out and lse are the forward's results; dlse (like lse, or None) is the gradient
    flowing into lse. Arguments validated by ops.attention.check_backward_args."""
    dq, dk, dv = (_grad_like(t) for t in (q, k, v))
    dout, q, k, v, out = (_unit_stride_head_dim(t) for t in (dout, q, k, v, out))
    lse = lse.to(torch.float32)
    dlse = dlse.to(torch.float32) if dlse is not None else None
    side = _side_inputs(alibi_slopes, sinks, key_padding_mask, cu_seqlens, cu_seqlens_k)
    alibi_slopes, sinks, key_padding_mask, cu_seqlens, cu_seqlens_k = side
    dsinks = torch.empty(q.shape[1], dtype=torch.float32) if sinks is not None else None  # [B|T, Hq, ...]
    varlen = cu_seqlens is not None
    _native().flash_attention_bwd_cpu(
        dout=dout.data_ptr(), dout_strides=bhm_strides(dout, varlen), dlse=_ptr(dlse),
        dlse_strides=lse_strides(dlse, varlen) if dlse is not None else (0, 0, 0), dq=dq.data_ptr(),
        dq_strides=bhm_strides(dq, varlen), dk=dk.data_ptr(), dk_strides=bhm_strides(dk, varlen), dv=dv.data_ptr(),
        dv_strides=bhm_strides(dv, varlen), dsinks=_ptr(dsinks),
        **_launch_args(q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens,
                       cu_seqlens_k, window_left, window_right, softcap, sinks))
    return dq, dk, dv, dsinks
