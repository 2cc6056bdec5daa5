"""Route a model's attention through `qlora_kernels.flash_attention`.

Llama and OPT: registered in transformers' attention interface as "qlora_kernels", with
FlashAttention-2's mask function (a 2-D key padding mask, or None), then selected with
`set_attn_implementation`. Bloom does not use that interface: its attention forward is
replaced per module (ALiBi from per-head slopes, `layer_past` caches) and restored on unpatch.
"""

from __future__ import annotations

import math
import types
import warnings

import torch
from torch import Tensor, nn

from ..attention import flash_attention

NAME = "qlora_kernels"
_PREVIOUS = "_qlora_kernels_previous_attn"


def _cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Offsets of packed sequences (positions restart at 0), or None for one sequence."""
    starts = torch.nonzero(position_ids.reshape(-1) == 0).flatten()
    if starts.numel() <= 1:
        return None
    total = torch.tensor([position_ids.numel()], device=starts.device)
    return torch.cat([starts, total]).to(torch.int32)


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
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    packable = attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if cu_seqlens is None and packable and position_ids is not None and not torch.compiler.is_compiling():
        cu_seqlens = _cu_seqlens_from_position_ids(position_ids)
    if cu_seqlens is not None and packable:
        cu_seqlens = cu_seqlens.to(torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        # [1, H, T, D] -> [T, H, D] views, no copy
        out = flash_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                              causal=causal, softmax_scale=scaling, cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen))
        return out.unsqueeze(0), None
    out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling, key_padding_mask=attention_mask)
    return out.transpose(1, 2), None


def register() -> None:
    """Make "qlora_kernels" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


# --- Bloom -------------------------------------------------------------------------------

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


def _bloom_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                             output_attentions=False, **kwargs):
    if output_attentions or (self.training and self.attention_dropout.p > 0) or (
            self.pretraining_tp > 1 and self.slow_but_exact):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                                  output_attentions, **kwargs)
    from transformers.models.bloom.modeling_bloom import dropout_add

    batch_size, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [B, H, S, D] views
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    out = flash_attention(query, key, value, causal=True, softmax_scale=self.inv_norm_factor,
                          alibi_slopes=_alibi_slopes_on(self.num_heads, hidden_states.device),
                          key_padding_mask=_key_padding_from_4d(attention_mask, key.shape[2]))
    context = out.transpose(1, 2).reshape(batch_size, q_length, self.num_heads * self.head_dim)
    output = dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None


def _bloom_attentions(model: nn.Module):
    from transformers.models.bloom.modeling_bloom import BloomAttention

    return [m for m in model.modules() if isinstance(m, BloomAttention)]


def patch_attention(model: nn.Module) -> list[str]:
    """Use flash_attention in `model`'s attention layers; returns what was patched."""
    blooms = _bloom_attentions(model)
    if blooms:
        for m in blooms:
            if "forward" not in m.__dict__:
                m.forward = types.MethodType(_bloom_attention_forward, m)
        return [f"bloom attention x{len(blooms)}"]
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise NotImplementedError(f"{type(model).__name__}: attention patching needs a transformers model")
    register()
    current = config._attn_implementation
    if current != NAME:
        setattr(model, _PREVIOUS, current)
        model.set_attn_implementation(NAME)
    return [f"attention interface '{NAME}' (was '{getattr(model, _PREVIOUS, current)}')"]


def unpatch_attention(model: nn.Module) -> None:
    for m in _bloom_attentions(model):
        m.__dict__.pop("forward", None)
    previous = model.__dict__.pop(_PREVIOUS, None)
    if previous is not None:
        model.set_attn_implementation(previous)
