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
from .._checks import require
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


@torch.library.custom_op("qlora_kernels::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit codes of fp32 `A` in blocks (the double-quant step for absmax)."""
    check_quantize_8bit_args(A, code, blocksize)
    return reference.quantize_blockwise_8bit(A, code, blocksize)


@quantize_blockwise_8bit.register_fake
def _(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    check_quantize_8bit_args(A, code, blocksize)
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((math.ceil(A.numel() / blocksize),), dtype=torch.float32)
