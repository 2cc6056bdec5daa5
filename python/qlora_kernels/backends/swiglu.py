"""SwiGLU kernels: C++ (csrc/swiglu_cpu.cpp) for CPU tensors, Triton (triton/swiglu.py) for CUDA
ones, and the Triton ones for CPU tensors under QLORA_KERNELS_TRITON_ON_CPU=1
(`register_triton_on_cpu`, called by triton_on_cpu.register).

Both kernels take 2-D operands with a unit column stride and any row stride. `_rows` gives
that view of a tensor without copying whenever its leading dims flatten to one row stride (a
contiguous tensor, or a half of Phi-3's gate_up); anything else is copied first. Outputs are
contiguous; the packed backward writes d(gate_up) as one [..., 2 * I] buffer, its two halves
addressed in place.
"""

from __future__ import annotations

import torch

from .._native import native
from ..ops import swiglu as ops
from .common import dtype_tag, kernel
from .cuda import cuda_kernel

_C = native()
ACTIVATION_TAGS = {"silu": 0, "gelu_tanh": 1}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, cols] with unit column stride: a view when the strides allow, else a copy."""
    cols = t.shape[-1]
    if t.stride(-1) != 1 and cols > 1:
        t = t.contiguous()
    try:
        return t.view(-1, cols)
    except RuntimeError:  # leading dims that no single row stride describes
        return t.reshape(-1, cols).contiguous()


# ---- the layouts, shared by both kernels: fwd(gate, up, out, activation), bwd(dout, gate, up, dgate, dup, activation)


def _forward(fwd, gate, up, activation):
    ops.check_args(gate, up, activation)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        fwd(_rows(gate), _rows(up), out.view(-1, gate.shape[-1]), activation)
    return out


def _backward(bwd, dout, gate, up, activation):
    ops.check_args(gate, up, activation, dout)
    dgate, dup = torch.empty_like(gate, memory_format=torch.contiguous_format), torch.empty_like(
        up, memory_format=torch.contiguous_format)
    if dgate.numel():
        cols = gate.shape[-1]
        bwd(_rows(dout), _rows(gate), _rows(up), dgate.view(-1, cols), dup.view(-1, cols), activation)
    return dgate, dup


def _packed_forward(fwd, gate_up, activation):
    ops.check_packed_args(gate_up, activation)
    half = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], half), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        rows = _rows(gate_up)
        fwd(rows[:, :half], rows[:, half:], out.view(-1, half), activation)
    return out


def _packed_backward(bwd, dout, gate_up, activation):
    ops.check_packed_args(gate_up, activation, dout)
    half = gate_up.shape[-1] // 2
    dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dgate_up.numel():
        rows, drows = _rows(gate_up), dgate_up.view(-1, 2 * half)
        bwd(_rows(dout), rows[:, :half], rows[:, half:], drows[:, :half], drows[:, half:], activation)
    return dgate_up


# ---- C++


def _cpp_fwd(gate, up, out, activation):
    rows, cols = gate.shape
    _C.swiglu_fwd_cpu(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), out.stride(0),
                      rows, cols, dtype_tag(gate.dtype), ACTIVATION_TAGS[activation], torch.get_num_threads())


def _cpp_bwd(dout, gate, up, dgate, dup, activation):
    rows, cols = gate.shape
    _C.swiglu_bwd_cpu(dout.data_ptr(), dout.stride(0), gate.data_ptr(), gate.stride(0), up.data_ptr(),
                      up.stride(0), dgate.data_ptr(), dgate.stride(0), dup.data_ptr(), dup.stride(0), rows, cols,
                      dtype_tag(gate.dtype), ACTIVATION_TAGS[activation], torch.get_num_threads())


if _C is not None:

    @kernel(ops.swiglu_fwd, "cpu", "C++")
    def swiglu_fwd_cpu(gate, up, activation):
        return _forward(_cpp_fwd, gate, up, activation)

    @kernel(ops.swiglu_bwd, "cpu", "C++")
    def swiglu_bwd_cpu(dout, gate, up, activation):
        return _backward(_cpp_bwd, dout, gate, up, activation)

    @kernel(ops.swiglu_packed_fwd, "cpu", "C++")
    def swiglu_packed_fwd_cpu(gate_up, activation):
        return _packed_forward(_cpp_fwd, gate_up, activation)

    @kernel(ops.swiglu_packed_bwd, "cpu", "C++")
    def swiglu_packed_bwd_cpu(dout, gate_up, activation):
        return _packed_backward(_cpp_bwd, dout, gate_up, activation)


# ---- Triton (imported on first use, as the CUDA backend's other kernels)


def _triton_fwd(gate, up, out, activation):
    from ..triton.swiglu import swiglu_fwd_triton

    swiglu_fwd_triton(gate, up, out, activation)


def _triton_bwd(dout, gate, up, dgate, dup, activation):
    from ..triton.swiglu import swiglu_bwd_triton

    swiglu_bwd_triton(dout, gate, up, dgate, dup, activation)


def triton_swiglu_fwd(gate, up, activation):
    return _forward(_triton_fwd, gate, up, activation)


def triton_swiglu_bwd(dout, gate, up, activation):
    return _backward(_triton_bwd, dout, gate, up, activation)


def triton_swiglu_packed_fwd(gate_up, activation):
    return _packed_forward(_triton_fwd, gate_up, activation)


def triton_swiglu_packed_bwd(dout, gate_up, activation):
    return _packed_backward(_triton_bwd, dout, gate_up, activation)


TRITON = {ops.swiglu_fwd: triton_swiglu_fwd, ops.swiglu_bwd: triton_swiglu_bwd,
          ops.swiglu_packed_fwd: triton_swiglu_packed_fwd, ops.swiglu_packed_bwd: triton_swiglu_packed_bwd}

for _op, _fn in TRITON.items():
    cuda_kernel(_op, "Triton")(_fn)


def register_triton_on_cpu(implementation: str = "Triton (interpreter)") -> None:
    """The Triton kernels for CPU tensors (backends/triton_on_cpu.py: needs TRITON_INTERPRET=1)."""
    for op, fn in TRITON.items():
        kernel(op, "cpu", implementation)(fn)
