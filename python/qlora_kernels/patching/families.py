"""The model families `patch` knows, keyed by transformers' `model_type`: how each one's
attention is routed through `qlora_kernels.flash_attention`, and which of the other parts of a
training step (loss, norm, rope, mlp: patching/<part>.py) apply to it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType, ModuleType
from typing import Callable

from torch import nn

from . import loss, mlp, norm, rope
from .attention import clear_strict, patch_interface, set_strict, unpatch_interface
from .bloom import patch_bloom, unpatch_bloom

# the parts of a training step besides attention and LoRA, in the order patch applies them;
# each is a module patching/<part>.py with FAMILIES, patch_<part>(model), unpatch_<part>(model)
PARTS = ("loss", "norm", "rope", "mlp")
# what each part replaces, in the words of the reports
PART_WHAT = {"loss": "lm_head + cross-entropy", "norm": "RMSNorm", "rope": "rotary embedding",
             "mlp": "gated MLP (SwiGLU)"}

PART_MODULES: dict[str, ModuleType] = {"loss": loss, "norm": norm, "rope": rope, "mlp": mlp}


@dataclasses.dataclass(frozen=True)
class Family:
    description: str  # what the attention patch covers, for users and the support matrix
    patch: Callable[[nn.Module], list[str]]
    unpatch: Callable[[nn.Module], None]
    # part -> what it replaces in this family (the part's own FAMILIES entry); a part missing
    # here does not apply (OPT and Bloom have no RMSNorm, no rotary embeddings, no gated MLP)
    parts: Mapping[str, str] = dataclasses.field(default_factory=dict)


_INTERFACE = dict(patch=patch_interface, unpatch=unpatch_interface)

_ATTENTION: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM (GQA included): attention interface", _INTERFACE),
    "mistral": ("MistralForCausalLM: attention interface, sliding window in-kernel", _INTERFACE),
    "qwen2": ("Qwen2ForCausalLM: attention interface, sliding window (use_sliding_window, max_window_layers) "
              "in-kernel", _INTERFACE),
    "qwen3": ("Qwen3ForCausalLM: attention interface, sliding window (use_sliding_window, max_window_layers) "
              "in-kernel", _INTERFACE),
    "gemma": ("GemmaForCausalLM: attention interface", _INTERFACE),
    "gemma2": ("Gemma2ForCausalLM: attention interface, alternating sliding window and logit softcap in-kernel",
               _INTERFACE),
    "gemma3_text": ("Gemma3ForCausalLM (text): attention interface, alternating sliding window in-kernel",
                    _INTERFACE),
    "phi3": ("Phi3ForCausalLM: attention interface, sliding window in-kernel", _INTERFACE),
    "opt": ("OPTForCausalLM: attention interface", _INTERFACE),
    "bloom": ("BloomForCausalLM: attention forward with ALiBi in-kernel", dict(patch=patch_bloom,
                                                                              unpatch=unpatch_bloom)),
}


def _parts_of(model_type: str) -> Mapping[str, str]:
    return MappingProxyType({part: module.FAMILIES[model_type] for part, module in PART_MODULES.items()
                             if model_type in module.FAMILIES})


FAMILIES: dict[str, Family] = {model_type: Family(description, **fns, parts=_parts_of(model_type))
                               for model_type, (description, fns) in _ATTENTION.items()}

# model_type -> what the attention patch covers
SUPPORTED = {name: family.description for name, family in FAMILIES.items()}


def part_functions(part: str) -> tuple[Callable[[nn.Module], list[str]], Callable[[nn.Module], None]]:
    """(patch_<part>, unpatch_<part>) of a part of PARTS."""
    module = PART_MODULES[part]
    return getattr(module, f"patch_{part}"), getattr(module, f"unpatch_{part}")


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
