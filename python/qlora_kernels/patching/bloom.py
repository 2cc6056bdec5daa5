"""Bloom's attention through `qlora_kernels.flash_attention`.

Bloom does not use transformers' attention interface: its attention forward is replaced per
module (ALiBi in-kernel from per-head slopes, `layer_past` caches) and restored on unpatch.
It gives what stock Bloom gives, also where the kernels' conventions differ from it: a static
cache's empty slots (patching/kv_cache.py) and queries that see no key (left padding).
"""

from __future__ import annotations

import math
import types

import torch
from torch import Tensor, nn

from ..attention import flash_attention
from .kv_cache import keys_seen_by_queries


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al., 2022, as Bloom was trained): for n heads, n a power
    of two, the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise those of the
    largest power of two p below n, then the first n - p odd-numbered slopes of 2p heads."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    p = 2 ** int(math.log2(num_heads))
    return [2.0 ** (-8.0 * i / p) for i in range(1, p + 1)] + [
        2.0 ** (-8.0 * (2 * i - 1) / (2 * p)) for i in range(1, num_heads - p + 1)]


# built once per (heads, device), not in every layer of every forward
_ALIBI_SLOPES: dict[tuple[int, torch.device], Tensor] = {}


def _alibi_slopes_on(num_heads: int, device: torch.device) -> Tensor:
    slopes = _ALIBI_SLOPES.get((num_heads, device))
    if slopes is None:
        slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)
        _ALIBI_SLOPES[(num_heads, device)] = slopes
    return slopes


def _key_padding_from_4d(mask: Tensor | None, kv_length: int) -> Tensor | None:
    # The last query row of a causal mask sees every key that is not padding. An all-True
    # mask is passed as is: testing for it would read the device in every layer.
    if mask is None:
        return None
    last = mask[:, 0, -1, :kv_length]
    return last if last.dtype == torch.bool else last == 0


def _as_stock_where_no_key_is_seen(out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                   key_padding_mask: Tensor, softmax_scale: float) -> Tensor:
    """`out` [B, H, Sq, D] of the kernels (keys aligned bottom-right, key_padding_mask [B, n])
    with stock Bloom's value in the rows whose query sees no key: the left pads, the last of
    which predicts the first token in a causal LM loss.

    Stock Bloom adds the dtype's minimum to masked scores, which absorbs them: such a row's
    softmax is uniform over all the layer's keys (key / value [B, H, N, D], a static cache's
    empty slots included), its output the mean of the values, and autograd still sends its
    gradient through the scores as through softmax at uniform probabilities:
    d out_i / d s_ij = (v_j - v_mean) / N. The fix-up below has that value and those gradients
    without an S x S matrix: g_i = scale / N * q_i K^T (V - v_mean), where V is detached
    (values only get the mean's gradient) and g - g.detach() is 0 in the forward. Which rows
    are found on the device, so nothing waits for it and the graph compiles."""
    seq_q, seq_k, n = query.shape[2], key_padding_mask.shape[-1], key.shape[2]
    seen = key_padding_mask.int().cumsum(dim=1) > 0  # some key up to this slot is attended
    has_key = seen[:, seq_k - seq_q:, None]  # [B, Sq, 1]: the query's own slot, bottom-right
    mean = value.float().mean(dim=2, keepdim=True)
    fix = mean
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        centered = (value.float() - mean).detach()
        g = query.float() @ (key.float().transpose(-1, -2) @ centered) * (softmax_scale / n)
        fix = mean + (g - g.detach())
    return torch.where(has_key[:, None], out, fix.to(out.dtype))


def _bloom_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                             output_attentions=False, **kwargs):
    if output_attentions or (self.training and self.attention_dropout.p > 0) or (
            self.pretraining_tp > 1 and self.slow_but_exact):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                                  output_attentions, **kwargs)
    from transformers.models.bloom.modeling_bloom import dropout_add

    batch_size, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [B, H, S, D] views
    last_slot = None
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
        # an int, or a device tensor for a static cache
        last_slot = layer_past.get_seq_length(self.layer_idx) - 1
    key_padding_mask = _key_padding_from_4d(attention_mask, key.shape[2])
    keys, values, key_padding_mask = keys_seen_by_queries(key, value, key_padding_mask, q_length, last_slot)
    out = flash_attention(query, keys, values, causal=True, softmax_scale=self.inv_norm_factor,
                          alibi_slopes=_alibi_slopes_on(self.num_heads, hidden_states.device),
                          key_padding_mask=key_padding_mask)
    if key_padding_mask is not None:
        out = _as_stock_where_no_key_is_seen(out, query, key, value, key_padding_mask, self.inv_norm_factor)
    context = out.transpose(1, 2).reshape(batch_size, q_length, self.num_heads * self.head_dim)
    output = dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None


def _bloom_attentions(model: nn.Module):
    from transformers.models.bloom.modeling_bloom import BloomAttention

    return [m for m in model.modules() if isinstance(m, BloomAttention)]


def patch_bloom(model: nn.Module) -> list[str]:
    """Replace the forward of every BloomAttention in `model`; returns what was patched."""
    blooms = _bloom_attentions(model)
    for m in blooms:
        if "forward" not in m.__dict__:
            m.forward = types.MethodType(_bloom_attention_forward, m)
    return [f"bloom attention x{len(blooms)}"]


def unpatch_bloom(model: nn.Module) -> None:
    for m in _bloom_attentions(model):
        m.__dict__.pop("forward", None)
