"""Fused linear + cross-entropy op: the loss of `reference.loss.linear_cross_entropy` without the
logits in memory, with autograd.

`qlora_kernels::linear_cross_entropy` walks the tokens in chunks (`run_chunks`). Per chunk:
logits = hidden[chunk] @ weight^T (+ bias) in the input dtype (a torch GEMM, as `lm_head`), upcast
to fp32; a row kernel (`RowsKernel`: reference, C++ or Triton, supplied by the backend) writes each
row's loss and overwrites the logits with the gradient of the reduced loss with respect to them;
then grad_hidden[chunk] = dlogits @ weight in the input dtype (what stock's backward computes) and,
when asked, grad_weight += dlogits^T @ hidden[chunk] and grad_bias += sum(dlogits) in fp32. The
gradients are thus computed in the forward, only the asked ones, and the backward scales them by
the loss's incoming gradient; no [tokens, vocab] tensor is kept. One chunk holds at most
`CHUNK_BYTES` of fp32 logits unless `chunk_size` (rows) says otherwise, so the peak memory beyond
the inputs and the gradients does not grow with the vocabulary past one chunk.

reduction "none" returns per-token losses; its gradient depends on a per-token incoming gradient,
so its forward computes no gradients and its backward runs the chunks again with those as row
scales (`row_scale`).

The caller says which gradients it needs (`grad_hidden`, `grad_weight`, `grad_bias`): the op runs
below autograd and cannot see requires_grad. `qlora_kernels.fused_linear_cross_entropy` sets them.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from .._checks import is_fake, require
from ..reference import loss as ref

# fp32 logits of one chunk (bytes): 64 MiB is 512 tokens at a vocabulary of 32,000.
CHUNK_BYTES = 64 * 2**20
REDUCTIONS = ref.REDUCTIONS
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RowsKernel(Protocol):
    def __call__(self, logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float, softcap: float,
                 scale: float, compute_grad: bool) -> Tensor:
        """fp32 logits [n, V] (row stride >= V, vocab contiguous), labels [n] int64 -> fp32 loss [n];
        with compute_grad the logits become scale * d(loss_i)/d(logits_i) (reference.loss.cross_entropy_rows)."""


def chunk_rows(vocab: int, chunk_size: int = 0) -> int:
    """Tokens per chunk: `chunk_size` when > 0, else as many as keep CHUNK_BYTES of fp32 logits."""
    if chunk_size > 0:
        return chunk_size
    return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))


def check_args(hidden, weight, bias, labels, row_scale, ignore_index, label_smoothing, softcap, reduction,
               num_items_in_batch, chunk_size) -> None:
    """Shapes, dtypes, devices and options; on real tensors also that every label is in [0, V) or
    ignore_index (one device sync)."""
    require(hidden.dim() == 2, f"hidden must be [tokens, hidden_size], got shape {tuple(hidden.shape)}")
    require(weight.dim() == 2, f"weight must be [vocab, hidden_size], got shape {tuple(weight.shape)}")
    require(hidden.dtype in FLOAT_DTYPES, f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    require(weight.dtype == hidden.dtype, f"weight dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    N, H = hidden.shape
    V = weight.shape[0]
    require(weight.shape[1] == H, f"weight is [vocab, {weight.shape[1]}] but hidden has hidden_size {H}")
    require(V > 0, "weight has an empty vocabulary")
    require(labels.dtype == torch.int64, f"labels must be int64, got {labels.dtype}")
    require(labels.dim() == 1 and labels.shape[0] == N,
            f"labels must be [{N}] (one per token of hidden), got shape {tuple(labels.shape)}")
    tensors = {"weight": weight, "labels": labels}
    if bias is not None:
        require(bias.dim() == 1 and bias.shape[0] == V, f"bias must be [{V}], got shape {tuple(bias.shape)}")
        require(bias.dtype == hidden.dtype, f"bias dtype {bias.dtype} differs from hidden's {hidden.dtype}")
        tensors["bias"] = bias
    if row_scale is not None:
        require(row_scale.dim() == 1 and row_scale.shape[0] == N,
                f"row_scale must be [{N}], got shape {tuple(row_scale.shape)}")
        tensors["row_scale"] = row_scale
    for name, t in tensors.items():
        require(t.device == hidden.device, f"{name} is on {t.device} but hidden is on {hidden.device}")
    require(reduction in REDUCTIONS, f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    require(0.0 <= label_smoothing <= 1.0, f"label_smoothing must be in [0, 1], got {label_smoothing}")
    require(math.isfinite(softcap) and softcap >= 0.0, f"softcap must be a finite number >= 0 (0: none), got {softcap}")
    require(num_items_in_batch is None or (math.isfinite(num_items_in_batch) and num_items_in_batch > 0),
            f"num_items_in_batch must be > 0, got {num_items_in_batch}")
    require(chunk_size >= 0, f"chunk_size must be >= 0 (0: from the memory budget), got {chunk_size}")
    if not is_fake(labels) and labels.numel():
        bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise ValueError(f"labels must be in [0, {V}) or ignore_index={ignore_index}; got {first} "
                             f"({int(bad.sum())} such labels)")


def _divisor(labels: Tensor, ignore_index: int, reduction: str, num_items_in_batch: float | None) -> float:
    """What the summed loss is divided by: num_items_in_batch when given; for "mean" the number of
    non-ignored labels (0: NaN loss, as torch); else 1."""
    if reduction == "none":
        return 1.0
    if num_items_in_batch is not None:
        return float(num_items_in_batch)
    if reduction == "sum":
        return 1.0
    return float((labels != ignore_index).sum())


def run_chunks(
    rows_kernel: RowsKernel, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
    row_scale: Tensor | None, ignore_index: int, label_smoothing: float, softcap: float, reduction: str,
    num_items_in_batch: float | None, chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's algorithm (module docstring) with a device's row kernel: every implementation of
    the op is this loop. Returns (loss, grad_hidden, grad_weight, grad_bias); a gradient not asked
    for is an empty tensor."""
    check_args(hidden, weight, bias, labels, row_scale, ignore_index, label_smoothing, softcap, reduction,
               num_items_in_batch, chunk_size)
    N, H = hidden.shape
    V = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    divisor = _divisor(labels, ignore_index, reduction, num_items_in_batch)
    scale = 1.0 / divisor if divisor > 0 else 0.0  # no valid label: every row's gradient is 0
    compute_grad = grad_hidden or grad_weight or grad_bias
    loss_rows = torch.empty(N, dtype=torch.float32, device=device)
    # a gradient not asked for is an empty tensor of its own (outputs of a custom op never alias)
    dh = torch.empty((N, H), dtype=dtype, device=device) if grad_hidden else hidden.new_empty(0)
    dw = torch.zeros((V, H), dtype=torch.float32, device=device) if grad_weight else hidden.new_empty(0)
    db = torch.zeros(V, dtype=torch.float32, device=device) if grad_bias else hidden.new_empty(0)
    weight_t = weight.t()
    step = chunk_rows(V, chunk_size)
    for start in range(0, N, step):
        end = min(N, start + step)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight_t) if bias is not None else torch.mm(h, weight_t)
        # Gemma2 / Gemma3 cap the logits in the model's dtype; the row kernel caps in fp32 (more
        # accurate than stock in fp16 / bf16, equal in fp32)
        logits = logits.float() if dtype != torch.float32 else logits
        loss_rows[start:end] = rows_kernel(logits, labels[start:end], ignore_index, label_smoothing, softcap, scale,
                                           compute_grad)
        if not compute_grad:
            continue
        if row_scale is not None:
            logits.mul_(row_scale[start:end, None].float())
        if grad_bias:
            db += logits.sum(0)
        if grad_weight:
            dw.addmm_(logits.t(), h.float())
        if grad_hidden:
            torch.mm(logits.to(dtype), weight, out=dh[start:end])
    if reduction == "none":
        loss = loss_rows
    else:
        loss = loss_rows.sum() / divisor
    if grad_weight and weight.dtype != torch.float32:
        dw = dw.to(weight.dtype)
    if grad_bias and dtype != torch.float32:
        db = db.to(dtype)
    return loss, dh, dw, db


@torch.library.custom_op("qlora_kernels::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, row_scale: Tensor | None, ignore_index: int,
    label_smoothing: float, softcap: float, reduction: str, num_items_in_batch: float | None, chunk_size: int,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) of reference.loss.linear_cross_entropy (softcap 0:
    none), the asked gradients computed in the forward for an incoming gradient of 1; each row's
    gradient times row_scale[row] when given. Default implementation: the chunks with the reference
    row kernel."""
    return run_chunks(ref.cross_entropy_rows, hidden, weight, bias, labels, row_scale, ignore_index, label_smoothing,
                      softcap, reduction, num_items_in_batch, chunk_size, grad_hidden, grad_weight, grad_bias)


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, labels, row_scale, ignore_index, label_smoothing, softcap, reduction, num_items_in_batch,
      chunk_size, grad_hidden, grad_weight, grad_bias):
    check_args(hidden, weight, bias, labels, row_scale, ignore_index, label_smoothing, softcap, reduction,
               num_items_in_batch, chunk_size)
    N = hidden.shape[0]
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    return (loss, torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight else hidden.new_empty(0),
            hidden.new_empty(weight.shape[0]) if grad_bias else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, row_scale, ignore_index, label_smoothing, softcap, reduction, num_items_in_batch,
     chunk_size, grad_hidden, grad_weight, grad_bias) = inputs
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.reduction = reduction
    ctx.computed = (grad_hidden, grad_weight, grad_bias)
    if reduction == "none":
        ctx.options = (ignore_index, label_smoothing, softcap, reduction, num_items_in_batch, chunk_size)
        ctx.save_for_backward(hidden, weight, bias, labels)
    else:
        ctx.save_for_backward(dh, dw, db)


def _backward(ctx, grad_loss, *_):
    want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    want_bias = ctx.needs_input_grad[2]
    if ctx.needs_input_grad[4]:
        raise RuntimeError("qlora_kernels::linear_cross_entropy: no gradient with respect to row_scale")
    if ctx.reduction == "none":
        hidden, weight, bias, labels = ctx.saved_tensors
        _, dh, dw, db = linear_cross_entropy(hidden, weight, bias, labels, grad_loss.float().contiguous(),
                                             *ctx.options, want_hidden, want_weight, want_bias)
    else:
        missing = [name for name, want, done in zip(("hidden", "weight", "bias"), (want_hidden, want_weight, want_bias),
                                                    ctx.computed) if want and not done]
        if missing:
            raise RuntimeError(f"qlora_kernels::linear_cross_entropy was called with grad_{missing[0]}=False but "
                               f"{missing[0]} requires grad: the gradients are computed in the forward, pass "
                               f"grad_{missing[0]}=True (qlora_kernels.fused_linear_cross_entropy does)")
        dh, dw, db = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype) if want_hidden else None
        dw = dw * grad_loss.to(dw.dtype) if want_weight else None
        db = db * grad_loss.to(db.dtype) if want_bias else None
    return (dh if want_hidden else None, dw if want_weight else None, db if want_bias else None,
            None, None, None, None, None, None, None, None, None, None, None)


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
