"""Linear + cross-entropy: the meaning of transformers' causal-LM loss, in plain PyTorch.

`linear_cross_entropy` is what a `*ForCausalLM` computes from its last hidden states once the
labels are shifted (transformers' `ForCausalLMLoss` / `fixed_cross_entropy`): the logits in the
input dtype (`lm_head`), the final logit softcap in that dtype too (Gemma2 / Gemma3), then
everything in fp32: `cross_entropy(logits.float(), labels)`, the mean over the tokens whose label
is not `ignore_index`, or with `num_items_in_batch` the sum divided by it (what the HF Trainer
passes, so that gradient accumulation averages over the whole batch). `label_smoothing` is
torch's. It materializes the logits; the op (`ops/loss.py`) computes the same without them.

`cross_entropy_rows` is the row-wise kernel's meaning: the loss of each row of fp32 logits and,
in place of the logits, its gradient (`ops.loss.cross_entropy_rows`).
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def softcap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma2's final_logit_softcapping, in the logits' dtype as its forward does."""
    if not softcap:
        return logits
    return torch.tanh(logits / softcap) * softcap


def linear_cross_entropy(
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
) -> torch.Tensor:
    """hidden [N, H], weight [V, H], labels [N] int64, bias [V] or None -> fp32 loss.

    reduction "mean": over the non-ignored tokens (NaN when every label is ignored, as torch);
    "sum"; "none": [N], 0 at ignored tokens. num_items_in_batch (reduction "mean" or "sum"): the
    summed loss divided by it, transformers' reading when the Trainer passes it.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = torch.nn.functional.linear(hidden, weight, bias)
    # transformers' logits.float(); fp64 stays fp64 (the tests' exact baseline)
    logits = softcap_logits(logits, softcap).to(torch.promote_types(logits.dtype, torch.float32))
    if num_items_in_batch is not None and reduction != "none":
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum",
                                                 label_smoothing=label_smoothing)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing)


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float = 0.0,
    scale: float = 1.0,
    compute_grad: bool = True,
) -> torch.Tensor:
    """fp32 logits [n, V] (before the softcap), labels [n] -> fp32 loss [n] (0 at ignored rows);
    fp64 logits are computed in fp64 (the tests' exact baseline).

    With compute_grad, logits is overwritten by scale * d(loss_i)/d(logits_i): softmax(z) minus
    the smoothed one-hot target, times the softcap's derivative 1 - (z / softcap)^2 where
    z = softcap * tanh(logits / softcap); rows with an ignored label are zero.
    """
    V = logits.shape[-1]
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    z = softcap * torch.tanh(x / softcap) if softcap else x
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)
    logp = torch.log_softmax(z, dim=-1)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    loss = (1.0 - label_smoothing) * nll - label_smoothing * logp.sum(-1) / V
    loss = torch.where(valid, loss, 0.0)
    if compute_grad:
        grad = logp.exp() - label_smoothing / V
        grad.scatter_add_(1, target[:, None], torch.full_like(grad[:, :1], -(1.0 - label_smoothing)))
        if softcap:
            grad = grad * (1.0 - (z / softcap).square())
        grad = torch.where(valid[:, None], grad * scale, 0.0)
        logits.copy_(grad)
    return loss
