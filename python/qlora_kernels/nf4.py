"""NF4 double-quant storage: quantize a weight, dequantize it, and the state between.

The bytes are bitsandbytes' (`quantize_4bit(..., quant_type="nf4")`): a checkpoint moves
between the two libraries without requantizing. See `checkpoint.py` for the state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import reference
from .ops import nf4 as ops

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class NF4QuantState:
    """Everything needed to dequantize one packed NF4 tensor.

    `absmax` is fp32 per block, or with double quant uint8 codes of `absmax - offset`
    quantized by `nested_absmax` / `nested_code` in blocks of `nested_blocksize`.
    `code` is the NF4 codebook (bitsandbytes' `quant_map`).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = reference.NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name (those that are set)."""
        names = ("absmax", "code", "offset", "nested_absmax", "nested_code")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def with_tensors(self, **tensors: torch.Tensor) -> NF4QuantState:
        return replace(self, **tensors)

    def to(self, device: torch.device | str) -> NF4QuantState:
        return self.with_tensors(**{k: v.to(device) for k, v in self.tensors().items()})


def packed_nbytes(numel: int) -> int:
    return (numel + 1) // 2


def _check_float_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; NF4 quantizes float32, float16 or bfloat16")


def _check_storage(quant_storage: torch.dtype) -> None:
    if quant_storage not in QUANT_STORAGE_DTYPES:
        raise ValueError(f"quant_storage={quant_storage} is not supported; use one of {QUANT_STORAGE_DTYPES}")


def view_as_storage(packed_u8: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """Flat uint8 bytes -> bitsandbytes' layout: shape (nbytes / itemsize, 1) of quant_storage."""
    _check_storage(quant_storage)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if packed_u8.numel() % itemsize:
        raise ValueError(
            f"{packed_u8.numel()} packed bytes cannot be stored as {quant_storage} ({itemsize} bytes each): "
            f"choose a weight with a multiple of {2 * itemsize} elements or quant_storage=torch.uint8"
        )
    return packed_u8.view(quant_storage).reshape(-1, 1)


def nf4_quantize(
    weight: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, NF4QuantState]:
    """Quantize `weight` to NF4 (bitsandbytes' bytes). Returns `(packed, state)`.

    `packed` has shape ((numel + 1) // 2 / itemsize, 1) in `quant_storage`: the same bytes
    whatever the storage dtype, viewed as bf16 (say) so FSDP / ZeRO-3 shard it like any
    bf16 tensor. Raises on a non-float weight, a blocksize bitsandbytes does not allow, or
    NaN / Inf values (they would silently poison a whole block).
    """
    _check_float_tensor("weight", weight)
    reference.check_blocksize(blocksize)
    _check_storage(quant_storage)
    weight = weight.detach()
    packed_u8, absmax = ops.nf4_quantize_blocks(weight, blocksize)
    # absmax is NaN / Inf exactly when its block holds one: a check of 1/blocksize the size
    if absmax.numel() and not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"weight has {bad} NaN/Inf value(s); refusing to quantize it")
    packed = view_as_storage(packed_u8, quant_storage)
    code = reference.nf4_code(weight.device)
    state = NF4QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code)
    if double_quant:
        offset = absmax.mean()
        absmax_q, nested_absmax = ops.quantize_blockwise_8bit(
            absmax - offset, reference.dynamic_code(weight.device), reference.NESTED_BLOCKSIZE
        )
        state = replace(
            state, absmax=absmax_q, offset=offset, nested_absmax=nested_absmax,
            nested_code=reference.dynamic_code(weight.device),
        )
    return packed, state


def check_packed(packed: torch.Tensor, state: NF4QuantState) -> None:
    """Raise unless `packed` holds exactly the bytes `state` describes, on its device."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    nbytes = packed.numel() * packed.element_size()
    want = packed_nbytes(state.numel)
    if nbytes != want:
        raise ValueError(
            f"packed holds {nbytes} bytes but a weight of shape {tuple(state.shape)} needs {want}"
        )
    for name, t in state.tensors().items():
        if t.device != packed.device:
            raise ValueError(f"packed is on {packed.device} but quant state {name} is on {t.device}")


def nf4_dequantize(packed: torch.Tensor, state: NF4QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4 -> `state.dtype` (or `dtype`) tensor of `state.shape`.

    A `dtype` other than state.dtype is reached the way bitsandbytes does (dequantize to
    state.dtype, then cast) unless state.dtype is fp32, where casting directly is identical.
    """
    check_packed(packed, state)
    dtype = dtype or state.dtype
    direct = dtype if state.dtype in (dtype, torch.float32) else state.dtype
    out = ops.nf4_dequantize(
        packed, state.absmax, state.nested_absmax, state.nested_code, state.offset,
        state.blocksize, state.nested_blocksize, list(state.shape), direct,
    )
    return out if out.dtype == dtype else out.to(dtype)


def bits_per_parameter(packed: torch.Tensor, state: NF4QuantState) -> float:
    """Storage of the weight and its whole quant state, in bits per weight element."""
    from .checkpoint import state_to_dict

    nbytes = packed.numel() * packed.element_size()
    nbytes += sum(t.numel() * t.element_size() for t in state_to_dict(state).values())
    return 8.0 * nbytes / state.numel
