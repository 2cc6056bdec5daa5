"""RMSNorm: the plain-PyTorch meaning, with the two roundings transformers uses.

For x [..., H] and weight [H], with the statistics of each row in fp32 (fp64 for fp64 x):

    rstd = rsqrt(mean(x^2) + eps)        n = x * rstd

- `cast_before_weight=True` (LlamaRMSNorm, and Mistral's, Qwen2's, Qwen3's (q_norm / k_norm
  too) and Phi3's, which are copies of it): n is rounded to x's dtype first, then multiplied by
  the weight, `weight * n.to(x.dtype)`. The product is in the promoted dtype of x and weight, so
  a bf16 x with an fp32 weight (PEFT's `prepare_model_for_kbit_training` upcasts norms) gives an
  fp32 output, as transformers does.
- `cast_before_weight=False` (GemmaRMSNorm, Gemma2's and Gemma3's, their q_norm / k_norm and
  pre / post feed-forward norms included): everything in fp32, `n * (offset + weight.float())`,
  rounded once to x's dtype at the end; Gemma stores the weight as an offset from 1
  (`offset=1.0`).

`offset` is added to the weight in fp32 in both modes (`offset=0.0`: the weight itself). With
`cast_before_weight=True` the product is computed in fp32 and rounded once to the output dtype,
which is what torch's `weight * n.to(x.dtype)` gives for offset 0: a product of two fp16 / bf16
values is exact in fp32.

The backward (`rms_norm_backward`) is the derivative of the fp32 math, with the rounding of n
to x's dtype taken as the identity (straight through, as autograd does for a cast):

    g = dy * (offset + weight)           dx = rstd * (g - n * mean(g * n))
    dweight = sum over rows of dy * n    (n rounded to x's dtype in the Llama mode)
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype, cast_before_weight: bool) -> torch.dtype:
    """What transformers returns: the promoted dtype in the Llama mode, x's in the Gemma one."""
    return torch.promote_types(x_dtype, weight_dtype) if cast_before_weight else x_dtype


def rms_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row 1 / sqrt(mean(x^2) + eps) [..., 1] in the compute dtype, computed as transformers does."""
    xf = x.to(compute_dtype(x.dtype))
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    """RMSNorm of x over its last dimension (see the module doc); differentiable."""
    compute = compute_dtype(x.dtype)
    xf = x.to(compute)
    n = xf * rms_rstd(x, eps)
    scale = weight.to(compute) + offset if offset else weight.to(compute)
    if cast_before_weight:
        out = output_dtype(x.dtype, weight.dtype, True)
        return (n.to(x.dtype).to(compute) * scale).to(out)
    return (n * scale).to(x.dtype)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                     cast_before_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): the op's forward, rstd [...] in the compute dtype (fp32; fp64 for fp64 x), what
    the backward reads."""
    y = rms_norm(x, weight, eps, offset, cast_before_weight)
    return y, rms_rstd(x, eps).squeeze(-1)


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                      cast_before_weight: bool, weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx in x's dtype, dweight in weight's dtype or None): the gradients of `rms_norm` at x,
    from the forward's rstd, in fp32 (fp64 for fp64 x)."""
    compute = compute_dtype(x.dtype)
    xf, dyf = x.to(compute), dy.to(compute)
    r = rstd.to(compute).unsqueeze(-1)
    n = xf * r
    g = dyf * (weight.to(compute) + offset)
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    dweight = None
    if weight_grad:
        nw = n.to(x.dtype).to(compute) if cast_before_weight else n
        dweight = (dyf * nw).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dweight
