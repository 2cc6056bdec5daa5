"""`qlora_kernels.lora_linear`: base + LoRA in one pass, dense or NF4 base, fwd and bwd."""

from __future__ import annotations

import torch

from .nf4_weight import NF4QuantState, NF4Weight
from .ops import lora as ops

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _row_or_column_major(weight: torch.Tensor) -> torch.Tensor:
    # every backend reads W [out, in] in either layout in place, so a GPT-2 Conv1D weight, stored
    # [in, out] and passed as its transpose, is not copied at each call
    if weight.is_contiguous() or weight.t().is_contiguous():
        return weight
    return weight.contiguous()


def _capturing_cuda_graph() -> bool:
    # torch.compile traces, it does not capture; a CPU-only torch raises on the capture query,
    # and no stream can be capturing before CUDA is initialized
    return (not torch.compiler.is_compiling() and torch.cuda.is_initialized()
            and torch.cuda.is_current_stream_capturing())


def lora_linear(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ in one pass (PEFT's `lora.Linear` forward).

    `weight`: a dense [out, in] tensor (frozen; row-major, or the transpose of a row-major
    [in, out] one such as a GPT-2 `Conv1D` weight, read in place), an `NF4Weight`,
    `(packed, NF4QuantState)`, or a layer holding one as `nf4_weight` (an `NF4Linear`).
    `lora_A` [r, in], `lora_B` [out, r] as PEFT stores them; `scaling` is alpha / r (or
    alpha / sqrt(r) for rsLoRA). Dropout (only when `training` and `dropout_p` > 0) is drawn
    in-kernel from a seed taken from torch's default generator, so `torch.manual_seed` makes
    it reproducible; that seed is drawn on the host, so a call with dropout refuses CUDA graph
    capture (replays would reuse one mask). Computes in x's dtype with fp32 accumulation;
    gradients flow to x, bias, lora_A and lora_B, never to the base weight.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise ValueError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if isinstance(weight, torch.nn.Module):
        weight = getattr(weight, "nf4_weight", weight)
    if isinstance(weight, tuple) and len(weight) == 2 and isinstance(weight[1], NF4QuantState):
        weight = NF4Weight(*weight)
    if isinstance(weight, NF4Weight):
        out_features, in_features = weight.shape
        weight_args = (None, *weight.op_args())
        device = weight.device
    elif isinstance(weight, torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out_features, in_features], got {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("lora_linear trains only the adapter: the base weight must be frozen (requires_grad=False)")
        out_features, in_features = weight.shape
        weight_args = (_row_or_column_major(weight.to(x.dtype)), None, None, None, None, None, 0, 0)
        device = weight.device
    else:
        raise TypeError(f"weight must be a tensor, an NF4Weight, (packed, NF4QuantState) or an NF4Linear, got "
                        f"{type(weight).__name__}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    rank = lora_A.shape[0]
    if lora_A.shape != (rank, in_features) or lora_B.shape != (out_features, rank):
        raise ValueError(f"lora_A must be [r, {in_features}] and lora_B [{out_features}, r]; got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if not 1 <= rank <= 256:
        raise ValueError(f"rank {rank} is not supported (1..256)")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the weight on {device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    if p > 0 and _capturing_cuda_graph():
        raise RuntimeError(
            f"lora_linear: dropout (dropout_p={dropout_p}, training=True) cannot be captured in a CUDA graph: its seed "
            "is drawn on the host at each call, so every replay would reuse one dropout mask. Capture with "
            "dropout_p=0 or training=False (model.eval()), or run the dropout steps outside the graph")
    # a CPU tensor, not an int: no .item() sync and no graph break under torch.compile
    seed = torch.randint(0, 2**31 - 1, (1,)) if p > 0 else torch.zeros(1, dtype=torch.int64)
    dtype = x.dtype
    x2d = x.reshape(-1, in_features).contiguous()
    y, _ = ops.lora_linear_fwd(
        x2d, *weight_args, out_features, None if bias is None else bias.to(dtype), lora_A.to(dtype).contiguous(),
        lora_B.to(dtype).contiguous(), float(scaling), p, seed,
    )
    return y.reshape(*x.shape[:-1], out_features)
