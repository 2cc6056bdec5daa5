"""The model families `patch` knows, keyed by transformers' `model_type`: how each one's
attention is routed through `qlora_kernels.flash_attention`."""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from .attention import clear_strict, patch_interface, set_strict, unpatch_interface
from .bloom import patch_bloom, unpatch_bloom


@dataclasses.dataclass(frozen=True)
class Family:
    description: str  # what the attention patch covers, for users and the support matrix
    patch: Callable[[nn.Module], list[str]]
    unpatch: Callable[[nn.Module], None]


_INTERFACE = dict(patch=patch_interface, unpatch=unpatch_interface)

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM (GQA included): attention interface", **_INTERFACE),
    "mistral": Family("MistralForCausalLM: attention interface, sliding window in-kernel", **_INTERFACE),
    "qwen2": Family("Qwen2ForCausalLM: attention interface, sliding window (use_sliding_window, "
                    "max_window_layers) in-kernel", **_INTERFACE),
    "qwen3": Family("Qwen3ForCausalLM: attention interface, sliding window (use_sliding_window, "
                    "max_window_layers) in-kernel", **_INTERFACE),
    "gemma": Family("GemmaForCausalLM: attention interface", **_INTERFACE),
    "gemma2": Family("Gemma2ForCausalLM: attention interface, alternating sliding window and logit softcap "
                     "in-kernel", **_INTERFACE),
    "gemma3_text": Family("Gemma3ForCausalLM (text): attention interface, alternating sliding window in-kernel",
                          **_INTERFACE),
    "phi3": Family("Phi3ForCausalLM: attention interface, sliding window in-kernel", **_INTERFACE),
    "opt": Family("OPTForCausalLM: attention interface", **_INTERFACE),
    "bloom": Family("BloomForCausalLM: attention forward with ALiBi in-kernel", patch_bloom, unpatch_bloom),
}

# model_type -> what the attention patch covers
SUPPORTED = {name: family.description for name, family in FAMILIES.items()}


def _family(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(f"{type(model).__name__}: attention patching supports the model types "
                                  f"{', '.join(FAMILIES)}, not {model_type!r}")
    return FAMILIES[model_type]


def patch_attention(model: nn.Module, strict: bool = False) -> list[str]:
    """Use flash_attention in the attention layers of `model` (a transformers model of a known
    family); returns what was patched. strict: an attention call the kernels do not implement
    (attention dropout, a custom 4-D mask, an unknown keyword, ...) raises NotImplementedError
    instead of running through transformers' SDPA with a warning."""
    patched = _family(model).patch(model)
    set_strict(model, strict)
    return patched


def unpatch_attention(model: nn.Module) -> None:
    _family(model).unpatch(model)
    clear_strict(model)
