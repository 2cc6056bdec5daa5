"""fused_linear_cross_entropy: a causal LM's `lm_head` + cross-entropy without the logits."""

from __future__ import annotations

import torch

from .ops import loss as loss_ops


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """cross_entropy((hidden @ weight.T + bias), labels) as transformers' causal-LM loss, fp32,
    computed over chunks of tokens so that the [tokens, vocab] logits never exist.

    hidden [..., H] (fp32 / fp16 / bf16), weight [V, H] and bias [V] in hidden's dtype, labels [...]
    int64 (hidden's leading shape; already shifted: label t is the target of hidden t), each in
    [0, V) or `ignore_index`, else ValueError. The logits are computed in the input dtype, then
    everything in fp32 (transformers' `logits.float()`). `softcap`: Gemma2's
    final_logit_softcapping, softcap * tanh(logits / softcap) (None or 0: none).
    `reduction`: "mean" over the non-ignored tokens (NaN if none, as torch), "sum", or "none"
    (per token, hidden's leading shape, 0 at ignored tokens). `num_items_in_batch` (what the HF
    Trainer passes): the summed loss divided by it, as transformers' `fixed_cross_entropy`.
    `label_smoothing`: torch's. `chunk_size`: tokens per chunk (default: 64 MiB of fp32 logits).

    The gradients with respect to hidden, and to weight / bias when they require grad, are computed
    during the forward (chunk by chunk) and scaled by the incoming gradient in the backward; under
    torch.no_grad or with nothing requiring grad only the loss is computed.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden must be a tensor [..., hidden_size]")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if reduction not in loss_ops.REDUCTIONS:
        raise ValueError(f"reduction must be one of {loss_ops.REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if num_items_in_batch is not None:
        num_items_in_batch = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch)
                                   else num_items_in_batch)
    # transformers moves the labels to the logits' device
    labels = labels.to(hidden.device) if labels.device != hidden.device else labels
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    grad = torch.is_grad_enabled()
    loss, _, _, _ = loss_ops.linear_cross_entropy(
        hidden_2d, weight, bias, labels.reshape(-1), None, int(ignore_index), float(label_smoothing),
        float(softcap or 0.0), reduction, num_items_in_batch, chunk_size or 0,
        grad and hidden.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    return loss.view(labels.shape) if reduction == "none" else loss
