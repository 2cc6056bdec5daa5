"""The fused linear + cross-entropy op per device: ops.loss.run_chunks (torch GEMMs per chunk of
tokens) with the device's row kernel, the C++ one (csrc/cross_entropy_cpu.cpp) on CPU, the
Triton one (triton/cross_entropy.py) on CUDA. `register_triton_on_cpu` puts the Triton row kernel
on CPU tensors (backends/triton_on_cpu.py)."""

from __future__ import annotations

import torch

from .._native import native
from ..ops import loss as loss_ops
from .common import kernel
from .cuda import cuda_kernel

_C = native()


def cross_entropy_rows_cpu(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                           softcap: float, scale: float, compute_grad: bool) -> torch.Tensor:
    """ops.loss.RowsKernel through csrc/cross_entropy_cpu.cpp (fp32 logits with a contiguous
    vocabulary dimension, int64 labels; checked by ops.loss.check_args)."""
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1 or logits.device.type != "cpu":
        raise ValueError("cross_entropy_rows_cpu: logits must be fp32 CPU with a contiguous vocabulary dimension")
    labels = labels.contiguous()
    loss = torch.empty(rows, dtype=torch.float32)
    if rows:
        _C.cross_entropy_rows_cpu(logits.data_ptr(), logits.stride(0), labels.data_ptr(), loss.data_ptr(), rows, vocab,
                                  int(ignore_index), float(label_smoothing), float(softcap), float(scale),
                                  bool(compute_grad), torch.get_num_threads())
    return loss


def cross_entropy_rows_triton(*args) -> torch.Tensor:
    # imported on first use: Triton is a GPU requirement only
    from ..triton.cross_entropy import cross_entropy_rows_triton as rows

    return rows(*args)


def linear_cross_entropy_cpu(*args):
    return loss_ops.run_chunks(cross_entropy_rows_cpu, *args)


def linear_cross_entropy_triton(*args):
    return loss_ops.run_chunks(cross_entropy_rows_triton, *args)


if _C is not None and hasattr(_C, "cross_entropy_rows_cpu"):
    kernel(loss_ops.linear_cross_entropy, "cpu", "C++ rows + torch GEMMs")(linear_cross_entropy_cpu)

cuda_kernel(loss_ops.linear_cross_entropy, "Triton rows + torch GEMMs")(linear_cross_entropy_triton)


def register_triton_on_cpu(implementation: str) -> None:
    """The Triton row kernel for CPU tensors, under Triton's interpreter."""
    kernel(loss_ops.linear_cross_entropy, "cpu", implementation)(linear_cross_entropy_triton)
