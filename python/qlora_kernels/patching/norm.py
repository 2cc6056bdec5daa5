"""Every RMSNorm of a model through `qlora_kernels.rms_norm`, with its family's rounding.

Each RMSNorm module instance gets an instance attribute `forward` (its class is untouched, so
another model in the process stays stock, and FSDP2's class swap keeps the patch); the weight
and eps are read from the module at every call. Unpatching deletes the attribute: the class's
forward is the module's again, exactly.

Llama's rounding (`LlamaRMSNorm` and its copies: Mistral, Qwen2, Qwen3 with q_norm / k_norm,
Phi-3): n rounded to the input dtype, then times the weight. Gemma's (Gemma, Gemma2, Gemma3
text with q_norm / k_norm and the pre / post feed-forward norms): fp32 throughout, times
(1 + weight), rounded once. OPT and Bloom use LayerNorm and are not covered.
"""

from __future__ import annotations

import importlib
import types

from torch import nn

from ..norm import rms_norm

# model_type -> what the norm patch replaces there
FAMILIES: dict[str, str] = {
    "llama": "LlamaRMSNorm (input, post-attention, final): Llama rounding",
    "mistral": "MistralRMSNorm (input, post-attention, final): Llama rounding",
    "qwen2": "Qwen2RMSNorm (input, post-attention, final): Llama rounding",
    "qwen3": "Qwen3RMSNorm (input, post-attention, final, q_norm, k_norm): Llama rounding",
    "gemma": "GemmaRMSNorm (input, post-attention, final): Gemma rounding, 1 + weight",
    "gemma2": "Gemma2RMSNorm (input, post-attention, pre/post feed-forward, final): Gemma rounding, 1 + weight",
    "gemma3_text": "Gemma3RMSNorm (input, post-attention, pre/post feed-forward, q_norm, k_norm, final): Gemma "
                   "rounding, 1 + weight",
    "phi3": "Phi3RMSNorm (input, post-attention, final): Llama rounding",
}

# model_type -> (transformers module, RMSNorm class, Gemma's rounding)
_CLASSES: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "LlamaRMSNorm", False),
    "mistral": ("mistral", "MistralRMSNorm", False),
    "qwen2": ("qwen2", "Qwen2RMSNorm", False),
    "qwen3": ("qwen3", "Qwen3RMSNorm", False),
    "gemma": ("gemma", "GemmaRMSNorm", True),
    "gemma2": ("gemma2", "Gemma2RMSNorm", True),
    "gemma3_text": ("gemma3", "Gemma3RMSNorm", True),
    "phi3": ("phi3", "Phi3RMSNorm", False),
}


def _llama_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, cast_before_weight=True)


def _gemma_forward(self, x):
    return rms_norm(x, self.weight, self.eps, 1.0, cast_before_weight=False)


_FORWARDS = (_llama_forward, _gemma_forward)


def _norm_class(model: nn.Module) -> tuple[type, bool]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _CLASSES:
        raise NotImplementedError(f"{type(model).__name__}: RMSNorm patching supports the model types "
                                  f"{', '.join(FAMILIES)}, not {model_type!r}")
    module, name, gemma = _CLASSES[model_type]
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name), gemma


def _is_patched(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) in _FORWARDS


def patch_norm(model: nn.Module) -> list[str]:
    """Route every RMSNorm of `model` (a transformers model of a family in FAMILIES) through the
    kernel; returns the names of the modules patched (all of them, also when they already were)."""
    cls, gemma = _norm_class(model)
    forward = _gemma_forward if gemma else _llama_forward
    patched = []
    for name, module in model.named_modules():
        if _is_patched(module):
            patched.append(name)
        elif isinstance(module, cls) and "forward" not in module.__dict__:
            module.forward = types.MethodType(forward, module)
            patched.append(name)
    return patched


def unpatch_norm(model: nn.Module) -> None:
    """Give every patched RMSNorm of `model` its class's forward back (a no-op where none is)."""
    for module in model.modules():
        if _is_patched(module):
            del module.forward
