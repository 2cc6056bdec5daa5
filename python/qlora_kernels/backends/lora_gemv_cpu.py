"""Decode on the CPU: y = x·Wᵀ + bias + scaling·xa·lora_Bᵀ for 1 <= M <= `MAX_ROWS` rows of x,
with an NF4 W read once from its packed bytes (C++ `_C.lora_gemv_nf4_cpu`, csrc/nf4_gemv_cpu.cpp).

W's values are those of `reference.nf4_dequantize(..., dtype=x.dtype)`; products and sums are
fp32 and y is rounded once to x's dtype. xa (the adapter's down-projection, fp32) and lora_B are
None at rank 0: the plain NF4 linear."""

from __future__ import annotations

import torch

from .._native import native
from ..nf4_weight import NF4Weight
from .common import DTYPE_TAGS, dtype_tag

_C = native()

# Most rows of x the GEMV takes (larger M belongs to a GEMM).
MAX_ROWS = 16 if _C is None else _C.lora_gemv_max_rows


def lora_gemv_cpu(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, xa: torch.Tensor | None,
                  lora_B: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """y [M, N] in x's dtype; x [M, K], weight an NF4 [N, K], bias [N] or None, xa [M, r] and
    lora_B [N, r] (both or neither). bias and lora_B are converted to x's dtype, xa to fp32."""
    if _C is None:
        raise RuntimeError("lora_gemv_cpu needs the native module qlora_kernels._C, which is not built")
    if x.dim() != 2 or x.dtype not in DTYPE_TAGS:
        raise ValueError(f"x must be 2-D fp32/fp16/bf16, got {tuple(x.shape)} {x.dtype}")
    M, K = x.shape
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows (tokens) for the GEMV, got {M}")
    if len(weight.shape) != 2 or weight.shape[1] != K:
        raise ValueError(f"the NF4 weight is {list(weight.shape)}, x has {K} features")
    N = weight.shape[0]
    if (xa is None) != (lora_B is None):
        raise ValueError("pass both xa and lora_B (rank r) or neither (rank 0)")
    r = 0 if lora_B is None else lora_B.shape[-1]
    if lora_B is not None and (lora_B.shape != (N, r) or xa.shape != (M, r)):
        raise ValueError(f"lora_B must be [{N}, r] and xa [{M}, r], got {tuple(lora_B.shape)} and {tuple(xa.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight.packed), ("bias", bias), ("xa", xa), ("lora_B", lora_B)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"lora_gemv_cpu runs on CPU tensors; {name} is on {t.device}")
    x = x.contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    lora_B = None if lora_B is None else lora_B.to(x.dtype).contiguous()
    xa = None if xa is None else xa.float().contiguous()
    y = torch.empty((M, N), dtype=x.dtype)
    _C.lora_gemv_nf4_cpu(
        x.data_ptr(), dtype_tag(x.dtype), M, K, *weight.native_pointers(), weight.nested_blocksize, weight.blocksize,
        N, 0 if bias is None else bias.data_ptr(), 0 if xa is None else xa.data_ptr(),
        0 if lora_B is None else lora_B.data_ptr(), r, float(scaling), y.data_ptr(), torch.get_num_threads(),
    )
    return y
