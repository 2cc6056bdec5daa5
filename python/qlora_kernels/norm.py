"""`qlora_kernels.rms_norm`: RMSNorm in one pass forward and one backward, fp32 statistics."""

from __future__ import annotations

import torch

from .ops import norm as ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    """RMSNorm of x [..., H] over its last dimension with weight [H], as transformers rounds it.

    rstd = rsqrt(mean(x^2) + eps) per row and n = x * rstd are fp32 (fp64 for fp64 x). Then
    `cast_before_weight=True` (Llama, Mistral, Qwen2/3, Phi-3): n is rounded to x's dtype and
    multiplied by `weight + offset`, the output in the promoted dtype of x and weight;
    `cast_before_weight=False` (Gemma 1/2/3: pass `offset=1.0`, Gemma's weight is stored as an
    offset from 1): `n * (weight + offset)` in fp32, rounded once to x's dtype.
    x and weight are float32, float16, bfloat16 (or float64) on one device; x may be
    non-contiguous. Gradients flow to x and, when it requires grad, to weight (fp32
    accumulation); the forward keeps x and one fp32 rstd per row for the backward.
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(cast_before_weight, bool):
        raise TypeError(f"cast_before_weight must be a bool, got {type(cast_before_weight).__name__}")
    y, _ = ops.rms_norm_fwd(x, weight, float(eps) if isinstance(eps, int) and not isinstance(eps, bool) else eps,
                            float(offset) if isinstance(offset, int) and not isinstance(offset, bool) else offset,
                            cast_before_weight)
    return y
