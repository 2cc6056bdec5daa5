"""The model families `patch` knows, keyed by transformers' `model_type`: how each one's
attention is routed through `qlora_kernels.flash_attention`."""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from .attention import patch_interface, unpatch_interface
from .bloom import patch_bloom, unpatch_bloom


@dataclasses.dataclass(frozen=True)
class Family:
    description: str  # what the attention patch covers, for users and the support matrix
    patch: Callable[[nn.Module], list[str]]
    unpatch: Callable[[nn.Module], None]


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM (GQA included): attention interface", patch_interface, unpatch_interface),
    "opt": Family("OPTForCausalLM: attention interface", patch_interface, unpatch_interface),
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


def patch_attention(model: nn.Module) -> list[str]:
    """Use flash_attention in the attention layers of `model` (a transformers model of a known
    family); returns what was patched."""
    return _family(model).patch(model)


def unpatch_attention(model: nn.Module) -> None:
    _family(model).unpatch(model)
