"""Plain-PyTorch meaning of every qlora_kernels op: the executable spec.

Every kernel (C++, CUDA, Triton) is tested against these functions, and they are the default
implementation of each registered op. One module per op family.
"""

from . import attention, lora, loss, norm, swiglu
from .nf4 import (
    ALLOWED_BLOCKSIZES,
    DYNAMIC_LUT_SIZE,
    NESTED_BLOCKSIZE,
    NF4_VALUES,
    check_blocksize,
    dequantize_blockwise_8bit,
    dynamic_code,
    dynamic_lut,
    nested_absmax,
    nf4_code,
    nf4_dequantize,
    nf4_midpoints,
    nf4_quantize_blocks,
    quantize_blockwise_8bit,
)

__all__ = [
    "attention",
    "lora",
    "loss",
    "norm",
    "swiglu",
    "ALLOWED_BLOCKSIZES",
    "DYNAMIC_LUT_SIZE",
    "NESTED_BLOCKSIZE",
    "NF4_VALUES",
    "check_blocksize",
    "dequantize_blockwise_8bit",
    "dynamic_code",
    "dynamic_lut",
    "nested_absmax",
    "nf4_code",
    "nf4_dequantize",
    "nf4_midpoints",
    "nf4_quantize_blocks",
    "quantize_blockwise_8bit",
]
