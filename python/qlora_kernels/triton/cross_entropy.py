"""Row-wise cross-entropy in Triton: the GPU row kernel of the fused linear + cross-entropy op
(ops/loss.py; meaning in reference/loss.py cross_entropy_rows).

One program per row of fp32 logits. The first loop over the vocabulary in BLOCK_V blocks keeps an
online max and sum of exponentials (and the sum of the logits, for label smoothing), so a row of
any length is read once for its log-sum-exp; the second loop, with compute_grad, overwrites the
row with scale * (softmax - smoothed target) * the softcap's derivative. A row whose label is
ignore_index gets loss 0 and a zero gradient without the first loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest vocabulary block: 4096 fp32 per loop step over 8 warps is 16 values per thread, in registers.
MAX_BLOCK_V = 4096


@triton.jit
def _softcapped(x, softcap, SOFTCAP: tl.constexpr):
    # softcap * tanh(x / softcap), tanh through the sigmoid (tl has no tanh): 2 sigmoid(2t) - 1
    if SOFTCAP:
        x = softcap * (2.0 * tl.sigmoid(2.0 * (x / softcap)) - 1.0)
    return x


@triton.jit
def cross_entropy_rows_kernel(logits_ptr, row_stride, labels_ptr, loss_ptr, vocab, ignore_index, label_smoothing,
                              softcap, scale, COMPUTE_GRAD: tl.constexpr, SOFTCAP: tl.constexpr,
                              BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row)
    offsets = tl.arange(0, BLOCK_V)
    if label != ignore_index:
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        sum_z = tl.zeros((), tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            inside = cols < vocab
            z = _softcapped(tl.load(row_ptr + cols, mask=inside, other=0.0), softcap, SOFTCAP)
            sum_z += tl.sum(tl.where(inside, z, 0.0), 0)
            z = tl.where(inside, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        # the op checked the labels; the mask keeps even a bad one from reading out of the row
        label_ok = (label >= 0) & (label < vocab)
        z_label = _softcapped(tl.load(row_ptr + label, mask=label_ok, other=0.0), softcap, SOFTCAP)
        smooth_each = label_smoothing / vocab
        tl.store(loss_ptr + row, lse - (1.0 - label_smoothing) * z_label - smooth_each * sum_z)
        if COMPUTE_GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                inside = cols < vocab
                z = _softcapped(tl.load(row_ptr + cols, mask=inside, other=0.0), softcap, SOFTCAP)
                g = tl.exp(z - lse) - smooth_each - tl.where(cols == label, 1.0 - label_smoothing, 0.0)
                if SOFTCAP:
                    t = z / softcap
                    g = g * (1.0 - t * t)
                tl.store(row_ptr + cols, g * scale, mask=inside)
    else:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                tl.store(row_ptr + cols, tl.zeros((BLOCK_V,), tl.float32), mask=cols < vocab)


def cross_entropy_rows_triton(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                              softcap: float, scale: float, compute_grad: bool) -> torch.Tensor:
    """fp32 logits [n, V] (vocab contiguous), labels [n] int64 -> fp32 loss [n]; with compute_grad
    the logits are overwritten by scale * the gradient (ops.loss.RowsKernel). Arguments validated
    by ops.loss.check_args."""
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_rows_triton: logits must have a contiguous vocabulary dimension")
    labels = labels.contiguous()
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    cross_entropy_rows_kernel[(n,)](
        logits, logits.stride(0), labels, loss, vocab, ignore_index, float(label_smoothing), float(softcap),
        float(scale), COMPUTE_GRAD=bool(compute_grad), SOFTCAP=softcap != 0.0, BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss
