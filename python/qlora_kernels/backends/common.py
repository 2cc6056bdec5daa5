"""What the native backends share: registration (with a record for `backends()`), dtype
tags and the 8-bit code table cache. NF4 weights reach the kernels as `NF4Weight`
(`nf4_weight.py`: its `native_pointers()` for the C++ / CUDA kernels)."""

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
