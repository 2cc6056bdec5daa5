"""Keys and values as the kernels expect them when a KV cache holds more slots than tokens.

A static cache (transformers' StaticCache: `generate(cache_implementation="static")`, compiled
decoding) hands attention its whole preallocated length, and the slots past the tokens seen so
far are empty. The kernels align the causal mask bottom-right (the last query sees up to the last
key), so the keys must end at the last query's slot:
- a 2-D padding mask shorter than the keys (transformers' flash-attention mask function gives the
  mask of the tokens seen so far) says how many: its length, a shape, not a device value;
- otherwise the caller gives the last query's slot (position_ids, the cache's length), a device
  value.
A slot known on the host cuts keys and values there. A device value, or any slot under
torch.compile (where a cut to a symbolic length would give keys and values sizes not known to
match): one query (decode) masks the empty slots; several queries (a prefill into the cache)
rotate keys and values so that the seen ones end last, and mask the empty ones, which then come
first. Nothing reads the device, so a compiled forward stays one graph.
"""

from __future__ import annotations

import torch
from torch import Tensor


def keys_seen_by_queries(key: Tensor, value: Tensor, key_padding_mask: Tensor | None, num_queries: int,
                         last_slot: Tensor | int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(key, value, key_padding_mask) ending at the last query's slot.

    key / value [B, H, S_k, D]; key_padding_mask None or bool [B, n] with n <= S_k (True =
    attend; n < S_k: the first n slots are the tokens seen so far); last_slot: the cache slot
    of the last query, an int or an integer tensor of one value or one per batch row ([B, 1],
    [1, 1], 0-d), None when unknown (the keys then end there).
    """
    seq_k = key.shape[2]
    compiling = torch.compiler.is_compiling()
    if key_padding_mask is not None and key_padding_mask.shape[-1] < seq_k:
        last_slot = key_padding_mask.shape[-1] - 1
        if compiling:
            key_padding_mask = torch.nn.functional.pad(key_padding_mask, (0, seq_k - key_padding_mask.shape[-1]))
    if last_slot is None or seq_k <= num_queries:
        return key, value, key_padding_mask
    if not isinstance(last_slot, Tensor) and not compiling:
        length = last_slot + 1
        if length >= seq_k:
            return key, value, key_padding_mask
        mask = None if key_padding_mask is None else key_padding_mask[:, :length]
        return key[:, :, :length], value[:, :, :length], mask
    batch = key.shape[0]
    slots = torch.arange(seq_k, device=key.device)
    last = last_slot.to(key.device).reshape(-1, 1) if isinstance(last_slot, Tensor) else last_slot
    if num_queries == 1:
        seen = (slots <= last).reshape(-1, seq_k).expand(batch, seq_k)
        return key, value, seen if key_padding_mask is None else seen & key_padding_mask
    # slot j moves to (j + shift) mod S_k, so the last query's slot lands on the last key
    shift = (seq_k - 1 - last).clamp(min=0) if isinstance(last, Tensor) else torch.sym_max(seq_k - 1 - last, 0)
    source = ((slots - shift) % seq_k).reshape(-1, seq_k)  # [B or 1, S_k]
    index = source[:, None, :, None]
    key, value = torch.take_along_dim(key, index, dim=2), torch.take_along_dim(value, index, dim=2)
    seen = (slots >= shift).reshape(-1, seq_k).expand(batch, seq_k)
    if key_padding_mask is not None:
        seen = seen & torch.take_along_dim(key_padding_mask, source.expand(batch, seq_k), dim=1)
    return key, value, seen


def interface_keys(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    """`keys_seen_by_queries` for transformers' attention interface: the 2-D mask covers the
    tokens seen so far; without one, the queries' position_ids are their slots (transformers
    counts them from the start of the cache when nothing is padded). A 4-D mask is left as is."""
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return key, value, attention_mask
        return keys_seen_by_queries(key, value, attention_mask, query.shape[2], None)
    position_ids = kwargs.get("position_ids")
    last_slot = position_ids[:, -1:] if position_ids is not None and position_ids.dim() == 2 else None
    return keys_seen_by_queries(key, value, None, query.shape[2], last_slot)
