"""Triton SwiGLU: out = act(gate) * up and its backward (reference/swiglu.py, csrc/swiglu.h).

Elementwise and memory-bound: one program per (row, block of BLOCK columns), every tensor 2-D
with a unit column stride and its own row stride, so the halves of Phi-3's gate_up (and their
gradient, written into one packed buffer) are addressed in place. fp32 math; act(gate) is
rounded to the dtype before the product as transformers does, and the backward's d_up uses
that rounded value. act(x) = x * sigmoid(z): z = x (silu) or 2 sqrt(2/pi) (x + 0.044715 x^3)
(gelu_tanh, whose 0.5 (1 + tanh) is that sigmoid). Under the interpreter bf16 is rounded on
the bits (`_cast_rn`), since its own cast truncates. FMA contraction stays on (named at launch:
Triton 3.9 warns when it is left to the default, which 3.10 changes): nothing here is held
to bit-exactness with another implementation, and a contracted product is the more accurate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_kernels.triton._common import _cast_rn, _interpreting

__all__ = ["swiglu_fwd_triton", "swiglu_bwd_triton", "ACTIVATION_TAGS"]

ACTIVATION_TAGS = {"silu": 0, "gelu_tanh": 1}
# Columns per program: 8 elements per thread at 4 warps (16-byte loads of bf16 / fp16).
BLOCK = 1024
GELU_K: tl.constexpr = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi)
GELU_C: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def _sigmoid_and_dz(g, ACTIVATION: tl.constexpr):
    """(sigmoid(z(g)), z'(g)) in fp32; act(g) = g * sigmoid(z)."""
    if ACTIVATION == 0:
        z = g
        dz = tl.full(g.shape, 1.0, tl.float32)
    else:
        g2 = g * g
        z = g * (GELU_K + (GELU_K * GELU_C) * g2)
        dz = GELU_K + (3.0 * GELU_K * GELU_C) * g2
    # from e = exp(-|z|) <= 1: nothing overflows, and e / (1 + e) keeps its relative precision
    # where z is very negative
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    s = tl.where(z >= 0, r, e * r)
    return s, dz


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, stride_out, cols,
                       ACTIVATION: tl.constexpr, NV_PTX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0).to(tl.float32)
    s, _ = _sigmoid_and_dz(g, ACTIVATION)
    a = _cast_rn(g * s, dtype, NV_PTX).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, _cast_rn(a * u, dtype, NV_PTX), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, stride_dout, stride_gate, stride_up,
                       stride_dgate, stride_dup, cols, ACTIVATION: tl.constexpr, NV_PTX: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    dtype = dgate_ptr.dtype.element_ty
    d = tl.load(dout_ptr + row * stride_dout + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0).to(tl.float32)
    s, dz = _sigmoid_and_dz(g, ACTIVATION)
    gs = g * s
    da = s + gs * (1.0 - s) * dz
    a = _cast_rn(gs, dtype, NV_PTX).to(tl.float32)
    tl.store(dgate_ptr + row * stride_dgate + offs, _cast_rn(d * u * da, dtype, NV_PTX), mask=mask)
    tl.store(dup_ptr + row * stride_dup + offs, _cast_rn(d * a, dtype, NV_PTX), mask=mask)


def _nv_ptx(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.version.hip is None and not _interpreting()


def _grid(rows: int, cols: int):
    return (rows, triton.cdiv(cols, BLOCK))


def swiglu_fwd_triton(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, activation: str) -> torch.Tensor:
    """out[r, c] = act(gate[r, c]) * up[r, c] for 2-D tensors of one shape and dtype, each with a
    unit column stride (checked by the caller: ops.swiglu validates, backends.swiglu lays out)."""
    rows, cols = gate.shape
    if rows and cols:
        _swiglu_fwd_kernel[_grid(rows, cols)](
            gate, up, out, gate.stride(0), up.stride(0), out.stride(0), cols,
            ACTIVATION=ACTIVATION_TAGS[activation], NV_PTX=_nv_ptx(gate), BLOCK=BLOCK, num_warps=4,
            enable_fp_fusion=True)
    return out


def swiglu_bwd_triton(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor,
                      dup: torch.Tensor, activation: str) -> None:
    """dgate = dout * up * act'(gate), dup = dout * act(gate) (2-D, as swiglu_fwd_triton)."""
    rows, cols = gate.shape
    if rows and cols:
        _swiglu_bwd_kernel[_grid(rows, cols)](
            dout, gate, up, dgate, dup, dout.stride(0), gate.stride(0), up.stride(0), dgate.stride(0),
            dup.stride(0), cols, ACTIVATION=ACTIVATION_TAGS[activation], NV_PTX=_nv_ptx(gate), BLOCK=BLOCK,
            num_warps=4, enable_fp_fusion=True)
