"""NF4 double-quant storage: quantize a weight, dequantize it, and the state between.

The bytes are bitsandbytes' (`quantize_4bit(..., quant_type="nf4")`): a checkpoint moves
between the two libraries without requantizing. The state dict format is `bnb_state_dict.py`;
the validated type (`NF4QuantState`, `NF4Weight`) is `nf4_weight.py`.
"""

from __future__ import annotations

import torch

from . import reference
from .nf4_weight import NF4QuantState, NF4Weight
from .ops import nf4 as ops

QUANT_STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


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
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    _check_storage(quant_storage)  # dtype and blocksize: the op checks them
    weight = weight.detach()
    packed_u8, absmax = ops.nf4_quantize_blocks(weight, blocksize)
    # absmax is NaN / Inf exactly when its block holds one: a check of 1/blocksize the size
    if absmax.numel() and not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"weight has {bad} NaN/Inf value(s); refusing to quantize it")
    packed = view_as_storage(packed_u8, quant_storage)
    code = reference.nf4_code(weight.device)
    if not double_quant:
        return packed, NF4QuantState(absmax, weight.shape, weight.dtype, blocksize, code)
    offset = absmax.mean()
    nested_code = reference.dynamic_code(weight.device)
    absmax_q, nested_absmax = ops.quantize_blockwise_8bit(absmax - offset, nested_code, reference.NESTED_BLOCKSIZE)
    state = NF4QuantState(absmax_q, weight.shape, weight.dtype, blocksize, code, offset=offset,
                          nested_absmax=nested_absmax, nested_code=nested_code)
    return packed, state


def nf4_dequantize(packed: torch.Tensor, state: NF4QuantState, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """NF4 -> `state.dtype` (or `dtype`) tensor of `state.shape`.

    A `dtype` other than state.dtype is reached the way bitsandbytes does (dequantize to
    state.dtype, then cast) unless state.dtype is fp32, where casting directly is identical.
    With `out` (contiguous, of state.shape, of that dtype, on the weight's device, sharing no
    memory with it) the values are written into `out`, which is returned: a caller that
    dequantizes repeatedly keeps one buffer instead of paying for a fresh one per call (on the
    CPU, the page faults of a new multi-MB tensor cost more than the kernel).
    """
    weight = NF4Weight(packed, state)
    dtype = dtype or state.dtype
    direct = dtype if state.dtype in (dtype, torch.float32) else state.dtype
    if out is None:
        result = ops.nf4_dequantize(*weight.op_args(), list(state.shape), direct)
        return result if result.dtype == dtype else result.to(dtype)
    ops.check_dequantize_out(out, state.shape, weight.device)
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}, the requested dtype is {dtype} (dtype, else state.dtype)")
    if direct == dtype:
        ops.nf4_dequantize_out(*weight.op_args(), list(state.shape), out)
    else:
        out.copy_(ops.nf4_dequantize(*weight.op_args(), list(state.shape), direct))
    return out
