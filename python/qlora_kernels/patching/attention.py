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
from ..reference.attention import keep_mask
from .kv_cache import interface_keys

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


# Keyword arguments of transformers' attention interface that do not change what attention
# computes (the packing ones are read by _packed_sequences; seq_idx, which TRL's padding-free
# collator adds for linear-attention layers, repeats the packing cu_seq_lens_q gives).
_NO_EFFECT = frozenset({"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
                        "use_cache", "cache_position", "past_key_values", "num_items_in_batch",
                        "output_hidden_states", "return_dict", "output_router_logits"})
# ones the kernels do not implement, harmless when None or False
_UNLESS_OFF = frozenset({"output_attentions", "position_bias", "head_mask"})

# fallbacks already warned about: one warning per reason
_WARNED: set[str] = set()
_STRICT = "_qlora_kernels_strict"
# set on the modules of a model whose attention was eager before the patch
_NO_KEY_AS_EAGER = "_qlora_kernels_no_key_as_eager"


def _not_in_kernels(dropout: float, attention_mask: Tensor | None, kwargs: dict) -> list[str]:
    """Why this call cannot run in the kernels (empty when it can)."""
    reasons = []
    if dropout > 0.0:
        reasons.append("attention dropout")
    if attention_mask is not None and attention_mask.dim() != 2:
        reasons.append("a custom 4-D attention mask")
    for name, value in kwargs.items():
        if name in _UNLESS_OFF:
            if value is not None and value is not False:
                reasons.append(name)
        elif name not in _NO_EFFECT:
            reasons.append(f"the keyword argument {name!r}")
    return reasons


def window_size(sliding_window: int | None) -> tuple[int, int]:
    """transformers' `sliding_window` W as flash-attn's (left, right): a query sees the W keys
    ending at its own position (W - 1 before it) under a causal mask, and the keys less than W
    away on either side without one (Gemma3's bidirectional layers)."""
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    return (sliding_window - 1, sliding_window - 1)


def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, causal, window, kwargs):
    """This call through transformers' SDPA attention function, with the mask the kernels would
    have applied: causal and window bottom-right aligned, key padding, packed sequences."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    Sq, Sk = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() != 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=causal)
    keep = keep_mask(Sq, Sk, causal, window, query.device).view(1, 1, Sq, Sk)
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, -Sk:]
    packable = attention_mask is None and query.shape[0] == 1 and Sq == Sk
    cu_seqlens, _ = _packed_sequences(query, kwargs) if packable else (None, 0)
    if cu_seqlens is not None:
        document = torch.searchsorted(cu_seqlens[1:-1], torch.arange(Sq, device=query.device), right=True)
        keep = keep & (document[:, None] == document[None, :])
    out, _ = sdpa_attention_forward(module, query, key, value, keep, dropout=dropout, scaling=scaling,
                                    is_causal=False)
    # [B, Sq, H, D]: a query with no key gives 0, as in the kernels
    return torch.where(keep.any(-1).transpose(1, 2)[..., None], out, 0), None


# Rows with no key, per padding mask (the layers of a forward share one per kind of layer) and
# per (causal, window, Sq, Sk): the device is read once per batch and window, not per layer.
_no_key_rows: dict[int, tuple[weakref.ref, int, dict]] = {}


def _rows_without_key(key_padding_mask: Tensor, causal: bool, window: tuple[int, int], Sq: int,
                      Sk: int) -> tuple[Tensor, Tensor]:
    """(batch, row) indices of the queries that see no key."""
    version = None if key_padding_mask.is_inference() else key_padding_mask._version
    entry = _no_key_rows.get(id(key_padding_mask))
    if entry is None or entry[0]() is not key_padding_mask or entry[1] != version:
        for dead in [k for k, (ref, _, _) in _no_key_rows.items() if ref() is None]:
            del _no_key_rows[dead]
        entry = (weakref.ref(key_padding_mask), version, {})
        if version is not None:
            _no_key_rows[id(key_padding_mask)] = entry
    shape = (causal, window, Sq, Sk)
    if shape not in entry[2]:
        left, right = window
        position = torch.arange(Sq, device=key_padding_mask.device) + (Sk - Sq)
        first = (position - left).clamp(min=0) if left >= 0 else torch.zeros_like(position)
        last = position if causal else torch.full_like(position, Sk - 1)
        if right >= 0:
            last = torch.minimum(last, position + right)
        kept = torch.nn.functional.pad(key_padding_mask.int().cumsum(1), (1, 0))
        entry[2][shape] = torch.nonzero(kept[:, last + 1] - kept[:, first] <= 0, as_tuple=True)
    return entry[2][shape]


def _eager_where_no_key(out: Tensor, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor,
                        causal: bool, window: tuple[int, int], scaling: float | None, softcap: float) -> Tensor:
    """`out` [B, H, Sq, D] with eager attention's value in the rows whose query sees no key.

    Eager attention adds the mask's minimum to every score of such a row, which absorbs the
    scores: softmax is uniform over all keys, so the row is the mean of every value, and its
    gradient still reaches the query and keys through softmax's Jacobian. The loss sees that
    row where the last left pad predicts the first token. Only on models whose attention was
    eager before the patch."""
    Sq, Sk = query.shape[2], key.shape[2]
    batch, row = _rows_without_key(key_padding_mask, causal, window, Sq, Sk)
    if batch.numel() == 0:
        return out
    groups = query.shape[1] // key.shape[1]
    keys, values = (t[batch].repeat_interleave(groups, dim=1) for t in (key, value))  # [n, H, Sk, D]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.einsum("nhd,nhkd->nhk", query[batch, :, row].float(), keys.float()) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores - scores.detach(), dim=-1)  # uniform, with softmax's gradient
    out = out.clone()
    out[batch, :, row] = torch.einsum("nhk,nhkd->nhd", probs, values.float()).to(out.dtype)
    return out


def attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, s_aux: Tensor | None = None, **kwargs):
    """transformers attention-interface function: q, k, v [B, H, S, D] -> ([B, S, H, D], None).

    sliding_window (Mistral, Qwen2/3, Gemma2/3, Phi-3), softcap (Gemma2) and s_aux (attention
    sinks) run in the kernels. Anything else that would change the result (attention dropout,
    a custom 4-D mask, output_attentions, an unknown keyword) goes to transformers' SDPA with
    one warning per reason, or raises NotImplementedError on a model patched with strict=True.
    """
    # a static cache's keys run past the tokens seen so far
    key, value, attention_mask = interface_keys(query, key, value, attention_mask, kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = window_size(sliding_window)
    cap = float(softcap) if softcap is not None else 0.0
    reasons = _not_in_kernels(dropout, attention_mask, kwargs)
    if reasons:
        if cap or s_aux is not None:
            raise NotImplementedError(f"qlora_kernels attention: {', '.join(reasons)} together with "
                                      f"{'softcap' if cap else 's_aux (attention sinks)'} is computed neither by the "
                                      "kernels nor by SDPA; use attn_implementation='eager' for this model")
        if getattr(module, _STRICT, False):
            raise NotImplementedError(f"qlora_kernels attention: {', '.join(reasons)} is not in the kernels, and "
                                      "this model was patched with strict=True (strict=False computes such calls "
                                      "with transformers' SDPA and warns)")
        for reason in reasons:
            if reason not in _WARNED:
                _WARNED.add(reason)
                warnings.warn(f"qlora_kernels attention: {reason} is not in the kernels; transformers' SDPA "
                              "computes these calls", stacklevel=2)
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, causal, window, kwargs)
    packable = attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    cu_seqlens, max_seqlen = _packed_sequences(query, kwargs) if packable else (None, 0)
    if cu_seqlens is not None:
        # [1, H, T, D] -> [T, H, D] views, no copy
        out = flash_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                              causal=causal, softmax_scale=scaling, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                              window_size=window, softcap=cap, sinks=s_aux)
        return out.unsqueeze(0), None
    out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling, key_padding_mask=attention_mask,
                          window_size=window, softcap=cap, sinks=s_aux)
    if attention_mask is not None and s_aux is None and getattr(module, _NO_KEY_AS_EAGER, False):
        # (with sinks, eager's sink takes all of such a row's weight: 0, as here)
        out = _eager_where_no_key(out, query, key, value, attention_mask, causal, window, scaling, cap)
    return out.transpose(1, 2), None


def register() -> None:
    """Make "qlora_kernels" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def set_strict(model: nn.Module, strict: bool) -> None:
    """strict=True: a call the kernels do not implement raises NotImplementedError instead of
    running through SDPA with a warning. Stored on the modules, not the config, so that it is
    never saved with the model."""
    # the attention function sees only the attention module, and every transformers attention
    # module keeps the config it picks its attention function from
    for module in model.modules():
        if hasattr(module, "config"):
            module.__dict__[_STRICT] = strict


def clear_strict(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop(_STRICT, None)


def patch_interface(model: nn.Module) -> list[str]:
    """Select "qlora_kernels" as `model`'s attention implementation; returns what was patched."""
    if not hasattr(model, "set_attn_implementation"):
        raise NotImplementedError(f"{type(model).__name__}: attention patching needs a transformers model")
    register()
    current = model.config._attn_implementation
    if current != NAME:
        setattr(model, _PREVIOUS, current)
        model.set_attn_implementation(NAME)
        # a query that sees no key (all padding) gets what the replaced attention gives it:
        # eager's mean of the values, or SDPA's and flash-attn's 0
        for module in model.modules():
            if hasattr(module, "config"):
                module.__dict__[_NO_KEY_AS_EAGER] = current == "eager"
    return [f"attention interface '{NAME}' (was '{getattr(model, _PREVIOUS, current)}')"]


def unpatch_interface(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop(_NO_KEY_AS_EAGER, None)
    previous = model.__dict__.pop(_PREVIOUS, None)
    if previous is not None:
        model.set_attn_implementation(previous)
