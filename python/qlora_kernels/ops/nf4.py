"""NF4 storage ops. The default implementation of each op is its meaning in
`reference/nf4.py`; backends register faster per-device kernels over it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference


@torch.library.custom_op("qlora_kernels::nf4_quantize_blocks", mutates_args=())
def nf4_quantize_blocks(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(packed uint8[(n+1)//2], absmax fp32[ceil(n/blocksize)]) of the flattened weight."""
    return reference.nf4_quantize_blocks(weight, blocksize)


@nf4_quantize_blocks.register_fake
def _(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
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
    """NF4 -> `dtype` of `shape`. With double quant `absmax` holds uint8 codes."""
    return reference.nf4_dequantize(
        packed, absmax, blocksize, shape, dtype, nested_absmax, nested_code, offset, nested_blocksize
    )


@nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("qlora_kernels::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit codes of fp32 `A` in blocks (the double-quant step for absmax)."""
    return reference.quantize_blockwise_8bit(A, code, blocksize)


@quantize_blockwise_8bit.register_fake
def _(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((math.ceil(A.numel() / blocksize),), dtype=torch.float32)
