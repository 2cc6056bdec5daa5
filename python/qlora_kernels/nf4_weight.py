"""`NF4Weight`: a packed NF4 weight and its quant state as the fused LoRA kernels take it.

Shared by the CPU path (backends/lora_cpu.py) and the GPU kernels: flat uint8 bytes plus the
absmax tensors, so a kernel needs no knowledge of `NF4QuantState` or the storage dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import reference


@dataclass(frozen=True)
class NF4Weight:
    """NF4 weight [N, K] (row-major flat, reference/nf4.py layout).

    packed: uint8, (N * K + 1) // 2 bytes. absmax: fp32 per `blocksize` flat elements, or with
    double quant uint8 codes expanded as nested_code[q] * nested_absmax[b // nested_blocksize]
    + offset (nested_absmax fp32, nested_code fp32[256], offset a 0-d fp32 tensor).
    dtype: the dtype the weight had before quantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    nested_blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, state) -> NF4Weight:
        """From `nf4.nf4_quantize`'s (packed, NF4QuantState) of a 2-D weight."""
        if len(state.shape) != 2:
            raise ValueError(f"an NF4Weight is 2-D, the state describes shape {tuple(state.shape)}")
        flat = packed.contiguous().reshape(-1)
        flat = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
        return cls(
            packed=flat, absmax=state.absmax, nested_absmax=state.nested_absmax, nested_code=state.nested_code,
            offset=state.offset, blocksize=int(state.blocksize), nested_blocksize=int(state.nested_blocksize),
            shape=(int(state.shape[0]), int(state.shape[1])), dtype=state.dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight through the reference (tests and fallbacks only: it materializes W)."""
        return reference.nf4_dequantize(
            self.packed, self.absmax, self.blocksize, self.shape, dtype or self.dtype, self.nested_absmax,
            self.nested_code, self.offset, self.nested_blocksize,
        )
