"""Triton RMSNorm forward and backward (the meaning: `qlora_kernels.reference.norm`).

One program per block of consecutive rows: a row [H] is one tile of BLOCK_H = next power of
two >= H lanes, held in registers between the statistic and the output, so x (and dy) are read
once. The backward accumulates its rows' dweight terms in fp32 registers and writes one partial
row per program; the launcher sums the partials over programs (a fixed order, no atomics).
rstd is 1 / sqrt_rn(mean + eps), correctly rounded steps, as close to torch's as it gets.

Hidden sizes up to MAX_HIDDEN: a row of 8192 fp32 lanes over 16 warps is 16 registers per
thread per tensor, and the backward keeps about six such tensors live. Larger rows are not
taken here (backends/norm.py sends them to the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_kernels.triton._common import _cast_rn, _interpreting

__all__ = ["MAX_HIDDEN", "rms_norm_fwd_triton", "rms_norm_bwd_triton"]

MAX_HIDDEN = 8192


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, rows, H, stride_x, rows_per_program, eps, offset,
                         CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_H: tl.constexpr, NV_PTX: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < H
    scale = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32) + offset
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for row in range(first, last):
        x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / H + eps)
        tl.store(rstd_ptr + row, rstd)
        n = x * rstd
        if CAST_BEFORE_WEIGHT:
            n = _cast_rn(n, x_ptr.dtype.element_ty, NV_PTX).to(tl.float32)
        y = n * scale
        tl.store(y_ptr + row * H + cols, _cast_rn(y, y_ptr.dtype.element_ty, NV_PTX), mask=in_row)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, H, stride_x, rows_per_program,
                         offset, CAST_BEFORE_WEIGHT: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK_H: tl.constexpr,
                         NV_PTX: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < H
    scale = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32) + offset
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for row in range(first, last):
        x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * H + cols, mask=in_row, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        if WEIGHT_GRAD:
            if CAST_BEFORE_WEIGHT:
                acc += dy * _cast_rn(n, x_ptr.dtype.element_ty, NV_PTX).to(tl.float32)
            else:
                acc += dy * n
        g = dy * scale
        c = tl.sum(g * n, axis=0) / H
        dx = rstd * (g - n * c)
        tl.store(dx_ptr + row * H + cols, _cast_rn(dx, dx_ptr.dtype.element_ty, NV_PTX), mask=in_row)
    if WEIGHT_GRAD:
        tl.store(dw_partial_ptr + pid * H + cols, acc, mask=in_row)


def _launch_shape(x2d: torch.Tensor) -> tuple[int, int, int, int]:
    """(programs, rows per program, BLOCK_H, warps) for rows of x2d."""
    rows, H = x2d.shape
    if H > MAX_HIDDEN:
        raise ValueError(f"the Triton RMSNorm takes rows of at most {MAX_HIDDEN} elements, got {H}")
    block_h = triton.next_power_of_2(H)
    if x2d.device.type == "cuda":
        # a few row blocks per SM: enough programs in flight to hide memory latency, few partials
        target = 4 * torch.cuda.get_device_properties(x2d.device).multi_processor_count
    else:  # the interpreter: several programs, so that the row blocks and partials are exercised
        target = 4
    programs = max(1, min(rows, target))
    per_program = triton.cdiv(rows, programs) if rows else 0
    programs = triton.cdiv(rows, per_program) if rows else 1
    warps = max(4, min(16, block_h // 256))
    return programs, per_program, block_h, warps


def _nv_ptx(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.version.hip is None and not _interpreting()


def rms_norm_fwd_triton(x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_before_weight: bool,
                        y_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d [rows, H] (unit column stride, any row stride) -> (y [rows, H] of y_dtype, rstd [rows] fp32)."""
    rows, H = x2d.shape
    y = torch.empty((rows, H), dtype=y_dtype, device=x2d.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x2d.device)
    if rows == 0:
        return y, rstd
    programs, per_program, block_h, warps = _launch_shape(x2d)
    _rms_norm_fwd_kernel[(programs,)](
        x2d, weight, y, rstd, rows, H, x2d.stride(0), per_program, float(eps), float(offset),
        CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_H=block_h, NV_PTX=_nv_ptx(x2d), num_warps=warps,
    )
    return y, rstd


def rms_norm_bwd_triton(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                        offset: float, cast_before_weight: bool,
                        weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dy2d [rows, H] contiguous, x2d as in the forward, rstd [rows] fp32 -> (dx [rows, H] of x's
    dtype, dweight [H] fp32 or None)."""
    rows, H = x2d.shape
    dx = torch.empty((rows, H), dtype=x2d.dtype, device=x2d.device)
    if rows == 0:
        return dx, torch.zeros((H,), dtype=torch.float32, device=x2d.device) if weight_grad else None
    programs, per_program, block_h, warps = _launch_shape(x2d)
    partial = torch.empty((programs, H) if weight_grad else (1,), dtype=torch.float32, device=x2d.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy2d, x2d, weight, rstd, dx, partial, rows, H, x2d.stride(0), per_program, float(offset),
        CAST_BEFORE_WEIGHT=cast_before_weight, WEIGHT_GRAD=weight_grad, BLOCK_H=block_h, NV_PTX=_nv_ptx(x2d),
        num_warps=warps,
    )
    return dx, partial.sum(0) if weight_grad else None
