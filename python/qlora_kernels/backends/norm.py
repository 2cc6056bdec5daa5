"""RMSNorm kernels: C++ for CPU tensors, Triton for CUDA ones (and for CPU tensors under
QLORA_KERNELS_TRITON_ON_CPU=1, through `triton_on_cpu`, which calls `register_triton_for_cpu`).

fp64 (gradcheck's dtype) runs the reference on every device, as do rows longer than the
Triton kernel's MAX_HIDDEN on CUDA."""

from __future__ import annotations

import torch

from .._native import native
from ..ops import norm as ops
from ..reference import norm as ref
from .common import dtype_tag, kernel
from .cuda import cuda_kernel

_C = native()

# the Triton kernel's row limit (triton/rms_norm.py MAX_HIDDEN), here so that importing this module
# does not import triton
TRITON_MAX_HIDDEN = 8192


def _reference_fwd(x, weight, eps, offset, cast_before_weight):
    y, rstd = ref.rms_norm_forward(x, weight, eps, offset, cast_before_weight)
    return y.contiguous(), rstd.contiguous()


def _reference_bwd(dy, x, weight, rstd, offset, cast_before_weight, weight_grad):
    dx, dweight = ref.rms_norm_backward(dy, x, weight, rstd, offset, cast_before_weight, weight_grad)
    return dx.contiguous(), ops.empty_dweight(weight) if dweight is None else dweight


def _native_dtypes(*tensors) -> bool:
    return all(t.dtype != torch.float64 for t in tensors)


def cpu_rms_norm_fwd(x, weight, eps, offset, cast_before_weight):
    ops.check_args(x, weight, eps, offset)
    if _C is None or not _native_dtypes(x, weight):
        return _reference_fwd(x, weight, eps, offset, cast_before_weight)
    y_dtype = ref.output_dtype(x.dtype, weight.dtype, cast_before_weight)
    x2d, weight = ops.rows_2d(x), weight.contiguous()
    rows, H = x2d.shape
    y = torch.empty(x.shape, dtype=y_dtype)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32)
    _C.rms_norm_fwd_cpu(x2d.data_ptr(), dtype_tag(x.dtype), x2d.stride(0), weight.data_ptr(), dtype_tag(weight.dtype),
                        rows, H, float(eps), float(offset), cast_before_weight, y.data_ptr(), dtype_tag(y_dtype),
                        rstd.data_ptr(), torch.get_num_threads())
    return y, rstd


def cpu_rms_norm_bwd(dy, x, weight, rstd, offset, cast_before_weight, weight_grad):
    ops.check_backward_args(dy, x, weight, rstd, offset, cast_before_weight)
    if _C is None or not _native_dtypes(x, weight, dy):
        return _reference_bwd(dy, x, weight, rstd, offset, cast_before_weight, weight_grad)
    x2d, weight = ops.rows_2d(x), weight.contiguous()
    dy, rstd = dy.contiguous(), rstd.contiguous()
    rows, H = x2d.shape
    dx = torch.empty(x.shape, dtype=x.dtype)
    dweight = torch.empty((H,), dtype=torch.float32) if weight_grad else None
    _C.rms_norm_bwd_cpu(dy.data_ptr(), dtype_tag(dy.dtype), x2d.data_ptr(), dtype_tag(x.dtype), x2d.stride(0),
                        weight.data_ptr(), dtype_tag(weight.dtype), rstd.data_ptr(), rows, H, float(offset),
                        cast_before_weight, dx.data_ptr(), 0 if dweight is None else dweight.data_ptr(),
                        torch.get_num_threads())
    return dx, ops.empty_dweight(weight) if dweight is None else dweight.to(weight.dtype)


def _triton_applies(x, *tensors) -> bool:
    return _native_dtypes(x, *tensors) and x.shape[-1] <= TRITON_MAX_HIDDEN


def triton_rms_norm_fwd(x, weight, eps, offset, cast_before_weight):
    ops.check_args(x, weight, eps, offset)
    if not _triton_applies(x, weight):
        return _reference_fwd(x, weight, eps, offset, cast_before_weight)
    from ..triton.rms_norm import rms_norm_fwd_triton

    y_dtype = ref.output_dtype(x.dtype, weight.dtype, cast_before_weight)
    y, rstd = rms_norm_fwd_triton(ops.rows_2d(x), weight.contiguous(), eps, offset, cast_before_weight, y_dtype)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def triton_rms_norm_bwd(dy, x, weight, rstd, offset, cast_before_weight, weight_grad):
    ops.check_backward_args(dy, x, weight, rstd, offset, cast_before_weight)
    if not _triton_applies(x, weight, dy):
        return _reference_bwd(dy, x, weight, rstd, offset, cast_before_weight, weight_grad)
    from ..triton.rms_norm import rms_norm_bwd_triton

    H = x.shape[-1]
    dx, dweight = rms_norm_bwd_triton(dy.contiguous().view(-1, H), ops.rows_2d(x), weight.contiguous(),
                                      rstd.contiguous().view(-1), offset, cast_before_weight, weight_grad)
    return dx.view(x.shape), ops.empty_dweight(weight) if dweight is None else dweight.to(weight.dtype)


if _C is not None:
    kernel(ops.rms_norm_fwd, "cpu", "C++")(cpu_rms_norm_fwd)
    kernel(ops.rms_norm_bwd, "cpu", "C++")(cpu_rms_norm_bwd)

cuda_kernel(ops.rms_norm_fwd, "Triton")(triton_rms_norm_fwd)
cuda_kernel(ops.rms_norm_bwd, "Triton")(triton_rms_norm_bwd)


def register_triton_for_cpu(implementation: str) -> None:
    """The Triton kernels for CPU tensors (the interpreter; backends/triton_on_cpu.py)."""
    kernel(ops.rms_norm_fwd, "cpu", implementation)(triton_rms_norm_fwd)
    kernel(ops.rms_norm_bwd, "cpu", implementation)(triton_rms_norm_bwd)
