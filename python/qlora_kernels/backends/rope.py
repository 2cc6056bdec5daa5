"""Rotary embeddings: the C++ kernel (csrc/rope_cpu.cpp) for CPU tensors, the Triton one
(triton/rope.py) for CUDA tensors; `triton_on_cpu` registers `rope_triton_kernel` for CPU
tensors in the C++ kernel's place.

Both run after `ops.rope.check_args` and write outputs laid out as `ops.rope.out_like` says
(the fake implementation's layout). They read any (batch, head, seq) strides of q / k and any
(batch, seq) strides of cos / sin; a head dim (or cos / sin row) that is not unit-stride (an
expanded gradient, say) is copied to a contiguous tensor first, consciously: it never comes
from transformers' own views.
"""

from __future__ import annotations

import torch

from .._native import native
from ..ops import rope as ops
from .common import dtype_tag, kernel
from .cuda import cuda_kernel


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _bhs(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _cos_strides(t: torch.Tensor) -> tuple[int, int]:
    # a batch of 1 is broadcast: stride 0
    return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1)


_C = native()

if _C is not None:

    @kernel(ops.rope, "cpu", "C++")
    def rope_cpu(q, k, cos, sin, backward):
        ops.check_args(q, k, cos, sin, backward)
        q_out, k_out = ops.out_like(q), ops.out_like(k)
        if q.numel() == 0 and k.numel() == 0:
            return q_out, k_out
        q, k, cos, sin = (_unit_last(t) for t in (q, k, cos, sin))
        B, Hq, S, D = q.shape
        _C.rope_cpu(
            q=q.data_ptr(), q_strides=_bhs(q), k=k.data_ptr(), k_strides=_bhs(k), q_out=q_out.data_ptr(),
            q_out_strides=_bhs(q_out), k_out=k_out.data_ptr(), k_out_strides=_bhs(k_out), cos=cos.data_ptr(),
            cos_strides=_cos_strides(cos), sin=sin.data_ptr(), sin_strides=_cos_strides(sin),
            dtype=dtype_tag(q.dtype), cos_dtype=dtype_tag(cos.dtype),
            batch=B, heads_q=Hq, heads_k=k.shape[1], seqlen=S, head_dim=D, rotary_dim=cos.shape[-1],
            backward=bool(backward), num_threads=torch.get_num_threads(),
        )
        return q_out, k_out


def rope_triton_kernel(q, k, cos, sin, backward):
    """The Triton kernel as the op's implementation (CUDA tensors; CPU ones under the interpreter)."""
    from ..triton.rope import rope_triton  # imported on first use, as the CUDA backend does

    ops.check_args(q, k, cos, sin, backward)
    q_out, k_out = ops.out_like(q), ops.out_like(k)
    rope_triton(q, k, cos, sin, q_out, k_out, backward)
    return q_out, k_out


cuda_kernel(ops.rope, "Triton")(rope_triton_kernel)
