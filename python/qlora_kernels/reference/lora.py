"""Fused LoRA linear: the plain-PyTorch meaning.

y = x · Wᵀ + bias + scaling · (dropout(x) · Aᵀ) · Bᵀ, PEFT's `lora.Linear` forward.

- x [..., K]; W [N, K] (dense; an NF4 weight is dequantized first); bias [N] or None;
  lora_A [r, K]; lora_B [N, r]; scaling a float (alpha / r, or alpha / sqrt(r) for rsLoRA).
- Dropout acts on the LoRA branch only: dropout(x) = x * keep / (1 - p), `keep` a bool mask of
  x's shape. GPU kernels draw `keep` from a seed with Philox; the CPU paths use
  `dropout_keep_mask` below (a counter-based hash, so forward and backward redraw it cheaply).
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


# SplitMix64 (Steele, Lea, Flood 2014): a Weyl sequence through a 64-bit finalizer. Counter-based:
# element i of the mask depends on (seed, i) only, so any slice can be drawn independently.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _i64(c: int) -> int:  # an unsigned 64-bit constant as the int64 with the same bits
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:  # logical shift right of int64 bit patterns
    return (z >> k) & ((1 << (64 - k)) - 1)


def dropout_threshold(dropout_p: float) -> int:
    """keep = 32 random bits >= this threshold, so P(keep) = 1 - p (to 2^-32)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    return int(dropout_p * 4294967296.0)


def dropout_keep_mask(seed: int, dropout_p: float, shape) -> torch.Tensor:
    """The CPU keep mask: pair j of the flattened mask is z = splitmix64(seed + (j + 1)·golden);
    element 2j keeps when z's low 32 bits >= dropout_threshold(p), element 2j + 1 its high 32 bits.
    Wrapping int64 arithmetic carries the unsigned one's bits."""
    n = 1
    for d in shape:
        n *= int(d)
    j = torch.arange(1, (n + 1) // 2 + 1, dtype=torch.int64)
    z = int(seed) + j * _i64(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _i64(_MIX1)
    z = (z ^ _shr(z, 27)) * _i64(_MIX2)
    z = z ^ _shr(z, 31)
    bits = torch.stack([z & 0xFFFFFFFF, _shr(z, 32)], dim=1).reshape(-1)[:n]
    return (bits >= dropout_threshold(dropout_p)).reshape(tuple(shape))
