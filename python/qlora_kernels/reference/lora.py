"""Fused LoRA linear: the plain-PyTorch meaning.

y = x · Wᵀ + bias + scaling · (dropout(x) · Aᵀ) · Bᵀ, PEFT's `lora.Linear` forward.

- x [..., K]; W [N, K] (dense; an NF4 weight is dequantized first); bias [N] or None;
  lora_A [r, K]; lora_B [N, r]; scaling a float (alpha / r, or alpha / sqrt(r) for rsLoRA).
- Dropout acts on the LoRA branch only: dropout(x) = x * keep / (1 - p), `keep` a bool mask of
  x's shape. Kernels draw `keep` from a seed (Philox) and can materialize it for tests.
- Math in fp32 (fp64 for fp64 inputs), result in x.dtype. No gradient flows to W.
"""

from __future__ import annotations

import torch


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    base = xf @ weight.detach().to(compute).t()
    if bias is not None:
        base = base + bias.to(compute)
    dropped = xf if keep is None else xf * keep.to(compute) / (1.0 - dropout_p)
    low_rank = (dropped @ lora_A.to(compute).t()) @ lora_B.to(compute).t()
    return (base + scaling * low_rank).to(x.dtype)
