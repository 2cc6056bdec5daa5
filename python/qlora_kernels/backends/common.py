"""What the native backends share: registration (with a record for `backends()`), dtype
tags and the 8-bit code table cache."""

from __future__ import annotations

import torch

from .. import reference

# op name -> {device type -> implementation}, what `qlora_kernels.backends()` reports
REGISTERED: dict[str, dict[str, str]] = {}


def kernel(op, device: str, implementation: str):
    """Register the decorated function as `op`'s kernel for `device` and record it."""
    def register(fn):
        op.register_kernel(device)(fn)
        REGISTERED.setdefault(op._name, {})[device] = implementation
        return fn
    return register

DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_luts: dict[tuple[bytes, torch.device], torch.Tensor] = {}


def dtype_tag(dtype: torch.dtype) -> int:
    try:
        return DTYPE_TAGS[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16") from None


def dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """The 65536-bin table of `code` (reference.dynamic_lut) on code's device, cached."""
    key = (code.detach().float().cpu().numpy().tobytes(), code.device)
    lut = _luts.get(key)
    if lut is None:
        lut = reference.dynamic_lut(code).to(code.device)
        _luts[key] = lut
    return lut


def as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Packed NF4 data as a flat contiguous uint8 tensor, whatever its storage dtype."""
    packed = packed.contiguous()
    return packed.view(torch.uint8).reshape(-1) if packed.dtype != torch.uint8 else packed.reshape(-1)


def nested_pointers(absmax, nested_absmax, nested_code, offset):
    """Addresses of the double-quant tensors (0 when there is no double quant)."""
    if nested_absmax is None:
        return absmax.data_ptr(), 0, 0, 0, 0
    return (
        0,
        absmax.data_ptr(),
        nested_absmax.data_ptr(),
        nested_code.data_ptr(),
        offset.data_ptr(),
    )

