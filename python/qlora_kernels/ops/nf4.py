"""NF4 storage ops. The default implementation of each op is its meaning in
`reference/nf4.py`; backends register faster per-device kernels over it.

Every implementation (default, fake, per-device) rebuilds the NF4 weight it was given with
`NF4Weight.from_op_args` (or runs `check_quantize_args`), so a direct op call with sizes that
do not fit is refused before any kernel reads memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from .._checks import is_fake, require
from ..nf4_weight import FLOAT_DTYPES, NESTED_CODE_SIZE, NF4Weight


def check_quantize_args(weight: Tensor, blocksize: int) -> None:
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight has dtype {weight.dtype}; NF4 quantizes {FLOAT_DTYPES}")
    reference.check_blocksize(blocksize)


def check_quantize_8bit_args(A: Tensor, code: Tensor, blocksize: int) -> None:
    if A.dtype != torch.float32 or code.dtype != torch.float32:
        raise ValueError(f"A and code must be float32, got {A.dtype} and {code.dtype}")
    require(code.numel() == NESTED_CODE_SIZE, f"code has {code.numel()} entries, expected {NESTED_CODE_SIZE}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if code.device != A.device:
        raise ValueError(f"code is on {code.device}, A on {A.device}")


@torch.library.custom_op("qlora_kernels::nf4_quantize_blocks", mutates_args=())
def nf4_quantize_blocks(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(packed uint8[(n+1)//2], absmax fp32[ceil(n/blocksize)]) of the flattened weight."""
    check_quantize_args(weight, blocksize)
    return reference.nf4_quantize_blocks(weight, blocksize)


@nf4_quantize_blocks.register_fake
def _(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    check_quantize_args(weight, blocksize)
    n = weight.numel()
    return (
        weight.new_empty(((n + 1) // 2,), dtype=torch.uint8),
        weight.new_empty((-(-n // blocksize),), dtype=torch.float32),
    )


@torch.library.custom_op("qlora_kernels::nf4_dequantize", mutates_args=())
def nf4_dequantize(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> Tensor:
    """NF4 -> `dtype` of `shape` (`NF4Weight.op_args()` + shape + dtype)."""
    w = NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                               shape, dtype)
    return w.dequantize_reference(dtype)


@nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, dtype):
    NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
                           dtype)
    return packed.new_empty(shape, dtype=dtype)


def check_dequantize_out(out: Tensor, shape, device: torch.device) -> None:
    """`out` can take a weight of `shape` on `device` dequantized: contiguous, of that shape,
    fp32/fp16/bf16, on that device."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    problems = []
    if tuple(out.shape) != tuple(shape):
        problems.append(f"shape {list(out.shape)} (the weight's is {list(shape)})")
    if out.dtype not in FLOAT_DTYPES:
        problems.append(f"dtype {out.dtype} (allowed: {FLOAT_DTYPES})")
    if out.device != device:
        problems.append(f"device {out.device} (the weight is on {device})")
    if not out.is_contiguous():
        problems.append(f"strides {out.stride()} (it must be contiguous)")
    if problems:
        raise ValueError(f"out has {', '.join(problems)}")


def _byte_range(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def check_no_overlap(out: Tensor, weight: NF4Weight) -> None:
    """`out` shares no byte with the weight's tensors (the kernels write out while reading them)."""
    if is_fake(out) or out.numel() == 0:
        return
    lo, hi = _byte_range(out)
    for name, t in (("packed", weight.packed), *weight.state.tensors().items()):
        if not is_fake(t) and t.numel():
            t_lo, t_hi = _byte_range(t)
            if lo < t_hi and t_lo < hi:
                raise ValueError(f"out overlaps the weight's {name}: the kernel would overwrite what it reads")


def dequantize_out_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
                          out) -> NF4Weight:
    """The weight `nf4_dequantize_out` received, checked, with `out` checked against it; every
    implementation of that op starts here."""
    check_dequantize_out(out, shape, absmax.device)
    w = NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                               shape, out.dtype)
    check_no_overlap(out, w)
    return w


@torch.library.custom_op("qlora_kernels::nf4_dequantize_out", mutates_args=("out",))
def nf4_dequantize_out(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    out: Tensor,
) -> None:
    """`nf4_dequantize`'s values in out's dtype written into `out` (contiguous, of `shape`): a
    caller that dequantizes the same shapes over and over reuses one buffer."""
    w = dequantize_out_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
                              out)
    out.copy_(w.dequantize_reference(out.dtype))


@nf4_dequantize_out.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, out):
    dequantize_out_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, out)


@torch.library.custom_op("qlora_kernels::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit codes of fp32 `A` in blocks (the double-quant step for absmax)."""
    check_quantize_8bit_args(A, code, blocksize)
    return reference.quantize_blockwise_8bit(A, code, blocksize)


@quantize_blockwise_8bit.register_fake
def _(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    check_quantize_8bit_args(A, code, blocksize)
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((math.ceil(A.numel() / blocksize),), dtype=torch.float32)
