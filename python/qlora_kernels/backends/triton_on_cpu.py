"""The CUDA backend's Triton kernels as the CPU kernels, run by Triton's interpreter.

`QLORA_KERNELS_TRITON_ON_CPU=1` (read once, when the backends are registered at import)
registers, for CPU tensors, the very functions the CUDA backend registers for GPU tensors:
the Triton LoRA forward / backward, the Triton flash attention forward / backward (with its
flash-decoding branch), the Triton NF4 dequantize (fresh or into `out`), the NF4 linear's
dequantize-once path, the Triton RMSNorm, rotary embedding and SwiGLU forward / backward and the
fused loss's cross-entropy rows (backends/norm.py, rope.py, swiglu.py, loss.py), in place of
the C++ kernels. Whole models then run the GPU code paths
(launchers, tiling, masking, the kernels themselves) on a machine without a GPU, slowly: it is
a test setting. NF4 quantize stays C++ (Triton has no
quantize kernel).

Triton compiles for a GPU unless TRITON_INTERPRET=1 was set before triton was imported, so
the switch refuses to run without it: a compiled kernel handed CPU pointers would crash or
read garbage.
"""

from __future__ import annotations

import os

from ..nf4_weight import NF4Weight
from ..ops import attention as attention_ops
from ..ops import lora as lora_ops
from ..ops import nf4 as nf4_ops
from ..ops import nf4_linear as nf4_linear_ops
from ..ops import rope as rope_ops
from . import cuda, rope, swiglu
from . import loss as loss_backend
from . import norm as norm_backend
from .common import kernel

SWITCH = "QLORA_KERNELS_TRITON_ON_CPU"
IMPLEMENTATION = "Triton (interpreter)"


def requested() -> bool:
    """Whether the switch is on (unset or empty: off); a value other than 0 / 1, or 1 without
    TRITON_INTERPRET=1, raises."""
    value = os.environ.get(SWITCH) or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{SWITCH}={value!r} is not understood; use 1 (Triton kernels for CPU tensors) or 0")
    if value == "0":
        return False
    interpret = os.environ.get("TRITON_INTERPRET")
    if interpret != "1":
        raise RuntimeError(
            f"{SWITCH}=1 runs the Triton kernels on CPU tensors through Triton's interpreter, which needs "
            f"TRITON_INTERPRET=1 in the environment before Python starts (got TRITON_INTERPRET={interpret!r})"
        )
    return True


def nf4_dequantize_triton_cpu(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
                              dtype):
    # imported on first use, as the CUDA backend does
    from ..triton.nf4_dequant import nf4_dequantize_triton

    w = NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
                               dtype)
    return nf4_dequantize_triton(w, dtype)


def nf4_dequantize_out_triton_cpu(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                  shape, out):
    from ..triton.nf4_dequant import nf4_dequantize_triton

    w = nf4_ops.dequantize_out_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                      shape, out)
    nf4_dequantize_triton(w, out.dtype, out=out)


def register() -> None:
    """Register the Triton implementations for "cpu", replacing the C++ ones (and `backends()`'s record)."""
    kernel(nf4_ops.nf4_dequantize, "cpu", IMPLEMENTATION)(nf4_dequantize_triton_cpu)
    kernel(nf4_ops.nf4_dequantize_out, "cpu", IMPLEMENTATION)(nf4_dequantize_out_triton_cpu)
    kernel(nf4_linear_ops.nf4_linear, "cpu", IMPLEMENTATION)(cuda.cuda_nf4_linear)
    kernel(nf4_linear_ops.nf4_linear_bwd, "cpu", IMPLEMENTATION)(cuda.cuda_nf4_linear_bwd)
    kernel(lora_ops.lora_linear_fwd, "cpu", IMPLEMENTATION)(cuda.triton_lora_linear_fwd)
    kernel(lora_ops.lora_linear_bwd, "cpu", IMPLEMENTATION)(cuda.triton_lora_linear_bwd)
    kernel(attention_ops.flash_attention_fwd, "cpu", IMPLEMENTATION)(cuda.triton_flash_attention_fwd)
    kernel(attention_ops.flash_attention_bwd, "cpu", IMPLEMENTATION)(cuda.triton_flash_attention_bwd)
    loss_backend.register_triton_on_cpu(IMPLEMENTATION)
    norm_backend.register_triton_for_cpu(IMPLEMENTATION)
    kernel(rope_ops.rope, "cpu", IMPLEMENTATION)(rope.rope_triton_kernel)
    swiglu.register_triton_on_cpu(IMPLEMENTATION)
