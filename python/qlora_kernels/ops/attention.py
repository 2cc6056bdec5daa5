"""Flash attention ops: forward (out, lse) and backward (dq, dk, dv, dsinks), with autograd.

Default implementations are `reference.attention` (S x S, for tests and devices without a
kernel); backends/ registers the tiled C++ (CPU) and Triton (CUDA) kernels. Conventions
(layouts, GQA, bottom-right causal, windows, softcap, ALiBi, sinks, padding, varlen) are
documented in `reference/attention.py`.

`check_args` is the one validator of the op's arguments: the default implementation, the fake
implementation (so torch.compile and the meta device see the same errors) and every backend
run it first, and the kernels trust what it let through.

Argument encoding: window_left / window_right -1 = unbounded; softcap 0 = none; max_seqlen /
max_seqlen_k are the longest sequences of cu_seqlens / cu_seqlens_k (0 when not varlen);
cu_seqlens_k None with cu_seqlens means keys are packed like queries. The backward returns
dsinks as fp32 [Hq], or an empty tensor when there are no sinks.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from .._checks import is_fake, require
from ..reference import attention as ref

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# the offsets checked last (q's and k's), with their version and the sizes they were checked
# against: every layer of a forward passes the same tensors, read once
_CHECKED_OFFSETS: list[tuple[weakref.ref, int, int, int]] = []


def _check_offsets(name: str, offsets: Tensor, total: int, max_len: int, max_name: str) -> None:
    """cu_seqlens values: 0 first, non-decreasing, `total` last, no sequence above max_len. Read
    on the host for CPU tensors (once per tensor and version); asserted on the device for CUDA
    ones (no host sync); skipped for fake tensors (their values do not exist)."""
    if is_fake(offsets):
        return
    if offsets.device.type == "cpu":
        version = None if offsets.is_inference() else offsets._version
        if any(ref() is offsets and (v, t, m) == (version, total, max_len) for ref, v, t, m in _CHECKED_OFFSETS):
            return
        values = offsets.tolist()
        lengths = [b - a for a, b in zip(values[:-1], values[1:])]
        if values[0] != 0 or values[-1] != total or any(n < 0 for n in lengths):
            raise ValueError(f"{name} must start at 0, never decrease and end at the {total} packed tokens; got "
                             f"{values if len(values) <= 16 else values[:8] + ['...'] + values[-4:]}")
        if max(lengths, default=0) > max_len:
            raise ValueError(f"{max_name}={max_len} is shorter than the longest sequence of {name} "
                             f"({max(lengths)})")
        if version is not None:
            _CHECKED_OFFSETS[:] = [*_CHECKED_OFFSETS[-1:], (weakref.ref(offsets), version, total, max_len)]
        return
    lengths = offsets[1:] - offsets[:-1]
    torch._assert_async((offsets[0] == 0) & (offsets[-1] == total) & (lengths >= 0).all(),
                        f"{name} must start at 0, never decrease and end at the {total} packed tokens")
    torch._assert_async(lengths.max() <= max_len, f"{max_name}={max_len} is shorter than a sequence of {name}")


def _check_side(name: str, t: Tensor | None, shape: tuple[int, ...], device: torch.device, what: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape or t.device != device:
        raise ValueError(f"{name} must be {what} {list(shape)} on {device}, got {list(t.shape)} on {t.device}")


def check_args(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, alibi_slopes: Tensor | None,
               key_padding_mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int,
               cu_seqlens_k: Tensor | None, max_seqlen_k: int, window_left: int, window_right: int, softcap: float,
               sinks: Tensor | None) -> None:
    """Raise ValueError / TypeError naming the argument unless the op's kernels can take these."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; flash_attention takes float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    varlen = cu_seqlens is not None
    rank = 3 if varlen else 4
    layout = "[total_tokens, heads, head_dim] with cu_seqlens" if varlen else "[batch, heads, seq, head_dim]"
    if not (q.dim() == k.dim() == v.dim() == rank):
        raise ValueError(f"q, k, v must be {layout}; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must match between q and k and be in 1..{MAX_HEAD_DIM}, got {head_dim} and "
                         f"{k.shape[-1]}")
    hq, hkv = (q.shape[1], k.shape[1])
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    for name, w in (("window_size[0]", window_left), ("window_size[1]", window_right)):
        if not isinstance(w, int) or w < -1:
            raise ValueError(f"{name} must be an int >= 0, or -1 for unbounded; got {w!r}")
    if not isinstance(softcap, (int, float)) or not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = none), got {softcap!r}")
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        _check_side(name, t, (hq,), q.device, "one value per query head,")
        if t is not None and not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if key_padding_mask is not None:
        if varlen:
            raise ValueError("key_padding_mask and cu_seqlens are exclusive: packed sequences carry no padding")
        _check_side("key_padding_mask", key_padding_mask, (k.shape[0], k.shape[2]), q.device, "bool [batch, seq_k] =")
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}; an "
                             "additive float mask is not a key padding mask")
    if not varlen:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k needs cu_seqlens (the queries' offsets)")
        return
    for name, t, max_name, max_len, total in (("cu_seqlens", cu_seqlens, "max_seqlen", max_seqlen, q.shape[0]),
                                              ("cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k, k.shape[0])):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != 1 or t.device != q.device:
            raise ValueError(f"{name} must be a 1-D int32 tensor of offsets on {q.device}, got "
                             f"{t.dtype if isinstance(t, Tensor) else type(t).__name__} "
                             f"{list(t.shape) if isinstance(t, Tensor) else ''} on {getattr(t, 'device', '')}")
        require(t.numel() >= 2, f"{name} needs at least 2 offsets (one sequence), got {t.numel()}")
        if not isinstance(max_len, (int, torch.SymInt)) or max_len < 0:
            raise ValueError(f"{max_name} must be an int >= 0 with {name}, got {max_len!r}")
        _check_offsets(name, t, total, max_len, max_name)
    if cu_seqlens_k is None:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q has {q.shape[0]} packed tokens and k {k.shape[0]}: pass cu_seqlens_k for keys "
                             "packed apart from queries")
    else:
        require(cu_seqlens_k.numel() == cu_seqlens.numel(),
                 f"cu_seqlens ({cu_seqlens.numel()} offsets) and cu_seqlens_k ({cu_seqlens_k.numel()}) must describe "
                 "the same number of sequences")


def check_backward_args(dout: Tensor, dlse: Tensor | None, q: Tensor, out: Tensor, lse: Tensor,
                        *args) -> None:
    """check_args(q, ..., *args) and the backward's own tensors: dout and out like q, lse and dlse
    fp32 [B, Hq, Sq] (varlen [Hq, Tq])."""
    check_args(q, *args)
    lse_shape = (q.shape[1], q.shape[0]) if args[6] is not None else tuple(q.shape[:3])
    for name, t in (("dout", dout), ("out", out)):
        if tuple(t.shape) != tuple(q.shape) or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's shape, dtype and device {list(q.shape)} {q.dtype} {q.device}, "
                             f"got {list(t.shape)} {t.dtype} {t.device}")
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is not None and (tuple(t.shape) != lse_shape or t.device != q.device or not t.dtype.is_floating_point):
            raise ValueError(f"{name} must be a float {list(lse_shape)} tensor on {q.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")


def reference_forward(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen,
                      cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap, sinks):
    """The op's arguments through reference.attention: (out, lse) in the op's layout."""
    feats = dict(window_size=(window_left, window_right), softcap=softcap, sinks=sinks)
    if cu_seqlens is not None:
        out, lse = ref.flash_attention_varlen(q, k, v, cu_seqlens, causal, softmax_scale, alibi_slopes,
                                              cu_seqlens_k=cu_seqlens_k, **feats)
    else:
        out, lse = ref.flash_attention(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, **feats)
    return out.contiguous(), lse.float().contiguous()


def reference_backward(dout, dlse, q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask,
                       cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap, sinks):
    """The op's arguments through reference.attention: (dq, dk, dv, dsinks) in the op's layout."""
    feats = dict(window_size=(window_left, window_right), softcap=softcap, sinks=sinks, dlse=dlse)
    if cu_seqlens is not None:
        dq, dk, dv, dsinks = ref.flash_attention_varlen_backward(dout, q, k, v, cu_seqlens, causal, softmax_scale,
                                                                 alibi_slopes, cu_seqlens_k=cu_seqlens_k, **feats)
    else:
        dq, dk, dv, dsinks = ref.flash_attention_backward(dout, q, k, v, causal, softmax_scale, alibi_slopes,
                                                          key_padding_mask, **feats)
    return (*grads_like_inputs((q, k, v), (dq, dk, dv)), no_sinks_grad(q) if dsinks is None else dsinks.float())


def no_sinks_grad(q: Tensor) -> Tensor:
    """The backward's dsinks output when there are no sinks."""
    return q.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("qlora_kernels::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, alibi_slopes: Tensor | None,
    key_padding_mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int, cu_seqlens_k: Tensor | None,
    max_seqlen_k: int, window_left: int, window_right: int, softcap: float, sinks: Tensor | None,
) -> tuple[Tensor, Tensor]:
    args = (q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
            max_seqlen_k, window_left, window_right, softcap, sinks)
    check_args(*args)
    return reference_forward(*args)


@flash_attention_fwd.register_fake
def _(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
      max_seqlen_k, window_left, window_right, softcap, sinks):
    check_args(q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
               max_seqlen_k, window_left, window_right, softcap, sinks)
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else q.shape[:3]
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(lse_shape, dtype=torch.float32))


@torch.library.custom_op("qlora_kernels::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
    softmax_scale: float, alibi_slopes: Tensor | None, key_padding_mask: Tensor | None, cu_seqlens: Tensor | None,
    max_seqlen: int, cu_seqlens_k: Tensor | None, max_seqlen_k: int, window_left: int, window_right: int,
    softcap: float, sinks: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
            max_seqlen_k, window_left, window_right, softcap, sinks)
    check_backward_args(dout, dlse, q, out, lse, *args)
    return reference_backward(dout, dlse, q, k, v, out, lse, *args[2:])


def grads_like_inputs(inputs, grads):
    """Gradients with their input's strides (a transposed view's gradient needs no copy
    downstream); every implementation returns this layout, as the fake does."""
    out = []
    for t, g in zip(inputs, grads):
        out.append(g if g.stride() == t.stride() else torch.empty_like(t).copy_(g))
    return tuple(out)


@flash_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen,
      cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap, sinks):
    check_backward_args(dout, dlse, q, out, lse, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask,
                        cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap, sinks)
    dsinks = q.new_empty((0,) if sinks is None else (q.shape[1],), dtype=torch.float32)
    return (*(torch.empty_like(t) for t in (q, k, v)), dsinks)


_SAVED_ARGS = ("causal", "softmax_scale", "max_seqlen", "max_seqlen_k", "window_left", "window_right", "softcap")


def _setup_context(ctx, inputs, output):
    (q, k, v, causal, softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, cu_seqlens_k,
     max_seqlen_k, window_left, window_right, softcap, sinks) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, key_padding_mask, cu_seqlens, cu_seqlens_k, sinks)
    for name, value in zip(_SAVED_ARGS, (causal, softmax_scale, max_seqlen, max_seqlen_k, window_left, window_right,
                                         softcap)):
        setattr(ctx, name, value)
    # an unused lse (the usual case) brings dlse = None, not a tensor of zeros to read
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes, key_padding_mask, cu_seqlens, cu_seqlens_k, sinks = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dsinks = flash_attention_bwd(
        dout.contiguous(), None if dlse is None else dlse.float().contiguous(), q, k, v, out, lse, ctx.causal,
        ctx.softmax_scale, alibi_slopes, key_padding_mask, cu_seqlens, ctx.max_seqlen, cu_seqlens_k,
        ctx.max_seqlen_k, ctx.window_left, ctx.window_right, ctx.softcap, sinks,
    )
    dsinks = dsinks.to(sinks.dtype) if sinks is not None else None
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, dsinks


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# The op's tensor layouts, as the kernels read them: q / k / v / out and their gradients are
# dense [B, H, S, D] or varlen [T, H, D] (no batch dimension: stride 0); lse and dlse are
# [B, Hq, Sq] or varlen [Hq, T].


def bhm_strides(t: Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, sequence) element strides of q, k, v, out or a gradient of theirs."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def lse_shape(q: Tensor, varlen: bool) -> tuple[int, ...]:
    """The shape of lse for queries q."""
    return (q.shape[1], q.shape[0]) if varlen else tuple(q.shape[:3])


def lse_strides(lse: Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, sequence) element strides of lse or dlse."""
    return (0, lse.stride(0), lse.stride(1)) if varlen else (lse.stride(0), lse.stride(1), lse.stride(2))
