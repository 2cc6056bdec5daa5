"""What more than one Triton kernel module uses, defined once.

Interpreter detection, and a cast that rounds like the GPU under the interpreter too
(TRITON_INTERPRET=1): its fp32 -> bf16 cast truncates (checked in Triton 3.9) where
NVIDIA's cvt.rn rounds to nearest even, so `_cast_rn` rounds on the bits there.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def _cast_rn(x, dtype: tl.constexpr, NV_PTX: tl.constexpr):
    """fp32 -> `dtype`, round to nearest even; without NV_PTX (the interpreter) bf16 is
    rounded on the bits, since the interpreter's own cast truncates."""
    if NV_PTX or dtype != tl.bfloat16:
        y = x.to(dtype)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        # the carry above would turn a NaN with a low payload into inf
        y = tl.where(x != x, x.to(tl.bfloat16), y)
    return y


def _interpreting() -> bool:
    # triton.jit picks the interpreter when a function is defined, so ask one of ours
    return not isinstance(_cast_rn, JITFunction)
