"""Route a model's attention through `qlora_kernels.flash_attention`.

The families that use transformers' attention interface (Llama, OPT, ...): "qlora_kernels" is
registered there with FlashAttention-2's mask function (a 2-D key padding mask, or None), then
selected with `set_attn_implementation`. Bloom does not use that interface (patching/bloom.py);
patching/families.py says which family takes which.

Packed sequences (a batch of one whose position_ids restart at 0, or the collator's
cu_seq_lens_q) take the varlen kernel. Their offsets are read from the device once per batch,
not per layer; under torch.compile through an op whose output length is a dynamic size, so
packing is honoured in a full graph too.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor, nn

from ..attention import flash_attention

NAME = "qlora_kernels"
_PREVIOUS = "_qlora_kernels_previous_attn"


def _offsets_from_position_ids(position_ids: Tensor) -> Tensor:
    """int32 offsets (on the host) of the sequences packed in `position_ids` [1, T]: one starts at
    the first token and wherever the position restarts at 0. One device-to-host read."""
    positions = position_ids.reshape(-1).cpu()
    starts = positions == 0
    starts[:1] = True
    total = torch.tensor([positions.numel()])
    return torch.cat([torch.nonzero(starts).flatten(), total]).to(torch.int32)


# The packing of the last batch, keyed on the tensor it came from (position_ids or the
# collator's cu_seq_lens_q) and that tensor's version: the 2nd..Nth layer of a forward and the
# recomputation of gradient checkpointing reuse it instead of reading the device again.
_last_batch: tuple[weakref.ref, int, Tensor, int] | None = None


def _cu_seqlens_once_per_batch(source: Tensor, from_position_ids: bool) -> tuple[Tensor, int]:
    """(cu_seqlens on source's device, max_seqlen) of position_ids [1, T] or of offsets."""
    global _last_batch
    # an inference tensor has no version counter to tell an in-place update apart
    version = None if source.is_inference() else source._version
    if version is not None and _last_batch is not None:
        ref, cached_version, cu_seqlens, max_seqlen = _last_batch
        if ref() is source and cached_version == version:
            return cu_seqlens, max_seqlen
    offsets = _offsets_from_position_ids(source) if from_position_ids else source.to("cpu", torch.int32)
    cu_seqlens = offsets.to(source.device) if from_position_ids else source.to(torch.int32)
    max_seqlen = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    if version is not None:
        _last_batch = (weakref.ref(source), version, cu_seqlens, max_seqlen)
    return cu_seqlens, max_seqlen


@torch.library.custom_op("qlora_kernels::cu_seqlens_from_position_ids", mutates_args=())
def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """Offsets of the sequences packed in position_ids [1, T], as an op: torch.compile sees
    their count as a dynamic size instead of breaking the graph at `nonzero`."""
    return _cu_seqlens_once_per_batch(position_ids, from_position_ids=True)[0].clone()


@cu_seqlens_from_position_ids.register_fake
def _(position_ids):
    return position_ids.new_empty(torch.library.get_ctx().new_dynamic_size(min=2), dtype=torch.int32)


def _packed_sequences(query: Tensor, kwargs: dict) -> tuple[Tensor | None, int]:
    """(cu_seqlens, max_seqlen) of the sequences packed in a [1, H, T, D] batch, from the
    collator's cu_seq_lens_q / max_length_q or from position_ids restarting at 0; (None, 0)
    for a single sequence."""
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    if (cu_seqlens is None and position_ids is None) or query.device.type == "meta":
        # meta tensors have no offsets to read, and packing does not change the output's shape
        return None, 0
    if torch.compiler.is_compiling():
        # No host read while tracing: the offsets' count stays a dynamic size, so a single
        # sequence goes through the varlen kernel too, and the total token count bounds
        # every sequence's length.
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_from_position_ids(position_ids)
        return cu_seqlens.to(torch.int32), max_seqlen if type(max_seqlen) is int else query.shape[2]
    if cu_seqlens is not None and type(max_seqlen) is int:
        return cu_seqlens.to(torch.int32), max_seqlen
    from_position_ids = cu_seqlens is None
    cu_seqlens, max_seqlen = _cu_seqlens_once_per_batch(position_ids if from_position_ids else cu_seqlens,
                                                        from_position_ids)
    return (cu_seqlens, max_seqlen) if cu_seqlens.numel() > 2 else (None, 0)


def attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention-interface function: q, k, v [B, H, S, D] -> ([B, S, H, D], None)."""
    if dropout > 0.0 or (attention_mask is not None and attention_mask.dim() != 2):
        # attention dropout and arbitrary 4-D masks are not in the kernel: SDPA computes those
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        warnings.warn("qlora_kernels attention: falling back to SDPA for attention dropout or a custom 4-D mask",
                      stacklevel=2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packable = attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    cu_seqlens, max_seqlen = _packed_sequences(query, kwargs) if packable else (None, 0)
    if cu_seqlens is not None:
        # [1, H, T, D] -> [T, H, D] views, no copy
        out = flash_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                              causal=causal, softmax_scale=scaling, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return out.unsqueeze(0), None
    out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling, key_padding_mask=attention_mask)
    return out.transpose(1, 2), None


def register() -> None:
    """Make "qlora_kernels" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def patch_interface(model: nn.Module) -> list[str]:
    """Select "qlora_kernels" as `model`'s attention implementation; returns what was patched."""
    if not hasattr(model, "set_attn_implementation"):
        raise NotImplementedError(f"{type(model).__name__}: attention patching needs a transformers model")
    register()
    current = model.config._attn_implementation
    if current != NAME:
        setattr(model, _PREVIOUS, current)
        model.set_attn_implementation(NAME)
    return [f"attention interface '{NAME}' (was '{getattr(model, _PREVIOUS, current)}')"]


def unpatch_interface(model: nn.Module) -> None:
    previous = model.__dict__.pop(_PREVIOUS, None)
    if previous is not None:
        model.set_attn_implementation(previous)
