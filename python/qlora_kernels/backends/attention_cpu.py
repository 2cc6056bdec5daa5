"""CPU flash attention: the C++ kernels of csrc/attention_cpu.cpp, through qlora_kernels._C.

Plain functions (op registration lives elsewhere) with the semantics of reference/attention.py.
Dense layout: q [B, Hq, Sq, D], k / v [B, Hkv, Sk, D] with any strides (HF's `.transpose(1, 2)`
views are read in place), lse [B, Hq, Sq]. Varlen layout (cu_seqlens given): q / k / v [T, H, D],
lse [Hq, T]. out and lse (fp32) are contiguous; dq / dk / dv keep their input's strides.
"""

from __future__ import annotations

import math

import torch

from .._native import native, native_error
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


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, seq) element strides; varlen tensors [T, H, D] have no batch dimension."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if varlen else tuple(q.shape[:3])


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    return (0, lse.stride(0), lse.stride(1)) if varlen else tuple(lse.stride())


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _check(q, k, v, alibi_slopes, key_padding_mask, cu_seqlens) -> None:
    # the kernels trust these sizes: anything inconsistent here would be an out-of-bounds read
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.device.type != "cpu" for t in (q, k, v)):
        raise ValueError("flash_attention_cpu needs CPU tensors")
    rank = 3 if cu_seqlens is not None else 4
    if q.dim() != rank or k.dim() != rank or k.shape != v.shape:
        raise ValueError(f"expected rank-{rank} q and k, v of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    heads_q = q.shape[-2] if cu_seqlens is not None else q.shape[1]
    if alibi_slopes is not None and alibi_slopes.numel() != heads_q:
        raise ValueError(f"alibi_slopes needs {heads_q} values, got {alibi_slopes.numel()}")
    if key_padding_mask is not None:
        if cu_seqlens is not None:
            raise ValueError("key_padding_mask cannot be combined with cu_seqlens")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must be [B, Sk] = {(k.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")


def _launch_args(q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens):
    """Keyword arguments shared by the forward and backward bindings. The tensors behind the side
    inputs' addresses must outlive the call: callers keep them (see _side_inputs)."""
    varlen = cu_seqlens is not None
    if varlen:
        batch, (seqlen_q, heads_q, head_dim), (seqlen_k, heads_kv) = cu_seqlens.numel() - 1, q.shape, k.shape[:2]
    else:
        (batch, heads_q, seqlen_q, head_dim), (heads_kv, seqlen_k) = q.shape, k.shape[1:3]
    return dict(
        q=q.data_ptr(), q_strides=_strides(q, varlen), k=k.data_ptr(), k_strides=_strides(k, varlen),
        v=v.data_ptr(), v_strides=_strides(v, varlen), out=out.data_ptr(), out_strides=_strides(out, varlen),
        lse=lse.data_ptr(), lse_strides=_lse_strides(lse, varlen), dtype=dtype_tag(q.dtype), batch=batch,
        heads_q=heads_q, heads_kv=heads_kv, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim,
        softmax_scale=softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim),
        causal=bool(causal), alibi_slopes=_ptr(alibi_slopes), key_padding_mask=_ptr(key_padding_mask),
        cu_seqlens=_ptr(cu_seqlens), num_threads=torch.get_num_threads(),
    )


def _side_inputs(alibi_slopes, key_padding_mask, cu_seqlens):
    """The kernels' formats: fp32 slopes, uint8 mask (1 = attend), int32 offsets; contiguous, CPU."""
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.detach().to("cpu", torch.float32).contiguous()
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to("cpu", torch.bool).to(torch.uint8).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to("cpu", torch.int32).contiguous()
    return alibi_slopes, key_padding_mask, cu_seqlens


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, contiguous; lse fp32 [B, Hq, Sq] or varlen [Hq, T]).

    max_seqlen is accepted for parity with the CUDA kernels; the CPU kernel reads the lengths
    from cu_seqlens.
    """
    _check(q, k, v, alibi_slopes, key_padding_mask, cu_seqlens)
    q, k, v = (_unit_stride_head_dim(t) for t in (q, k, v))
    alibi_slopes, key_padding_mask, cu_seqlens = _side_inputs(alibi_slopes, key_padding_mask, cu_seqlens)
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(_lse_shape(q, cu_seqlens is not None), dtype=torch.float32)
    _native().flash_attention_fwd_cpu(
        **_launch_args(q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens))
    return out, lse


def flash_attention_bwd_cpu(
    dout: torch.Tensor,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in q's dtype, strided like q, k, v; out and lse are the forward's results."""
    _check(q, k, v, alibi_slopes, key_padding_mask, cu_seqlens)
    if dout.shape != q.shape or out.shape != q.shape or dout.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError("dout and out must have q's shape and dtype")
    lse_shape = _lse_shape(q, cu_seqlens is not None)
    if tuple(lse.shape) != lse_shape:
        raise ValueError(f"lse must be {lse_shape}, got {tuple(lse.shape)}")
    dq, dk, dv = (_grad_like(t) for t in (q, k, v))
    dout, q, k, v, out = (_unit_stride_head_dim(t) for t in (dout, q, k, v, out))
    lse = lse.to(torch.float32)
    alibi_slopes, key_padding_mask, cu_seqlens = _side_inputs(alibi_slopes, key_padding_mask, cu_seqlens)
    varlen = cu_seqlens is not None
    _native().flash_attention_bwd_cpu(
        dout=dout.data_ptr(), dout_strides=_strides(dout, varlen), dq=dq.data_ptr(), dq_strides=_strides(dq, varlen),
        dk=dk.data_ptr(), dk_strides=_strides(dk, varlen), dv=dv.data_ptr(), dv_strides=_strides(dv, varlen),
        **_launch_args(q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens))
    return dq, dk, dv
