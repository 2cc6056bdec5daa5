"""The gated MLPs of the Llama-style families through `qlora_kernels.swiglu`.

Each MLP module instance gets its own `forward` (an instance attribute; the class and every
other model stay stock), which calls its projections as the stock forward does (so PEFT LoRA
layers, bitsandbytes / NF4 bases and hooks on them keep working) and replaces only the
elementwise middle: `down_proj(swiglu(gate_proj(x), up_proj(x)))`, or for Phi-3
`down_proj(swiglu_packed(gate_up_proj(x)))`, whose two halves are read in place and whose
gradient is written as one buffer. The forward keeps only the projections' outputs for the
backward, not act(gate) nor the product.

Activations: transformers' `silu` / `swish` -> "silu", `gelu_pytorch_tanh` -> "gelu_tanh",
read from the module's activation object (what the stock forward calls), not from the config
string alone. An MLP whose activation is anything else (Gemma checkpoints with exact `gelu`,
`gelu_python_tanh`, ...) is left stock, is not in the names `patch_mlp` returns, and one
warning says so; a model none of whose MLPs qualifies returns []. A call whose gate and up the
kernels cannot take (different dtypes, float64) runs the stock expression.
"""

from __future__ import annotations

import importlib
import types
import warnings

import torch
from torch import nn

from ..ops.swiglu import DTYPES
from ..swiglu import swiglu, swiglu_packed

FAMILIES: dict[str, str] = {
    "llama": "LlamaMLP: down_proj(silu(gate_proj(x)) * up_proj(x)) -> swiglu",
    "mistral": "MistralMLP: down_proj(silu(gate_proj(x)) * up_proj(x)) -> swiglu",
    "qwen2": "Qwen2MLP: down_proj(silu(gate_proj(x)) * up_proj(x)) -> swiglu",
    "qwen3": "Qwen3MLP: down_proj(silu(gate_proj(x)) * up_proj(x)) -> swiglu",
    "gemma": "GemmaMLP: down_proj(gelu_tanh(gate_proj(x)) * up_proj(x)) -> swiglu (gelu_pytorch_tanh)",
    "gemma2": "Gemma2MLP: down_proj(gelu_tanh(gate_proj(x)) * up_proj(x)) -> swiglu (gelu_pytorch_tanh)",
    "gemma3_text": "Gemma3MLP: down_proj(gelu_tanh(gate_proj(x)) * up_proj(x)) -> swiglu (gelu_pytorch_tanh)",
    "phi3": "Phi3MLP: down_proj(up * silu(gate)) of gate_up_proj(x)'s halves -> swiglu_packed, read in place",
}

# model_type -> (module, MLP class, attribute holding the activation, packed gate_up)
_MLPS = {
    "llama": ("llama", "LlamaMLP", "act_fn", False),
    "mistral": ("mistral", "MistralMLP", "act_fn", False),
    "qwen2": ("qwen2", "Qwen2MLP", "act_fn", False),
    "qwen3": ("qwen3", "Qwen3MLP", "act_fn", False),
    "gemma": ("gemma", "GemmaMLP", "act_fn", False),
    "gemma2": ("gemma2", "Gemma2MLP", "act_fn", False),
    "gemma3_text": ("gemma3", "Gemma3MLP", "act_fn", False),
    "phi3": ("phi3", "Phi3MLP", "activation_fn", True),
}

# instance attributes of a patched MLP: (activation name, the activation object classified, its attribute)
_STATE = "_qlora_kernels_swiglu"


def activation_of(act: nn.Module) -> str | None:
    """The swiglu activation computing exactly what `act` (a transformers activation module)
    computes, or None."""
    from transformers.activations import GELUTanh, SiLUActivation

    if type(act) in (nn.SiLU, SiLUActivation):
        return "silu"
    fn = getattr(act, "act", None)
    if (type(act) is GELUTanh and getattr(fn, "func", None) is torch.nn.functional.gelu
            and getattr(fn, "keywords", None) == {"approximate": "tanh"} and not getattr(fn, "args", ())):
        return "gelu_tanh"
    return None


def _kernels_take(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.dtype == up.dtype and gate.dtype in DTYPES and gate.shape == up.shape and gate.device == up.device


def _gated_forward(self, x):
    activation, act, attribute = self.__dict__[_STATE]
    gate, up = self.gate_proj(x), self.up_proj(x)
    if getattr(self, attribute) is act and _kernels_take(gate, up):
        return self.down_proj(swiglu(gate, up, activation))
    return self.down_proj(getattr(self, attribute)(gate) * up)


def _packed_forward(self, hidden_states):
    activation, act, attribute = self.__dict__[_STATE]
    gate_up = self.gate_up_proj(hidden_states)
    if getattr(self, attribute) is act and gate_up.dtype in DTYPES:
        return self.down_proj(swiglu_packed(gate_up, activation))
    gate, up = gate_up.chunk(2, dim=-1)
    return self.down_proj(up * getattr(self, attribute)(gate))


def _mlp_class(model_type: str) -> type:
    module, name, _, _ = _MLPS[model_type]
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _mlps(model: nn.Module, model_type: str) -> list[tuple[str, nn.Module]]:
    cls = _mlp_class(model_type)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def patch_mlp(model: nn.Module) -> list[str]:
    """Route every gated MLP of `model` (a transformers model of a type in FAMILIES) through
    swiglu; returns the names (relative to `model`) of the MLPs that now run it, those patched
    before included. Patching again changes nothing. MLPs whose activation swiglu does not
    implement stay stock (one warning). Raises NotImplementedError for another model type."""
    model_type = _model_type(model)
    if model_type not in FAMILIES:
        raise NotImplementedError(f"{type(model).__name__}: the SwiGLU MLP patch covers the model types "
                                  f"{', '.join(FAMILIES)}, not {model_type!r}")
    _, _, attribute, packed = _MLPS[model_type]
    forward = _packed_forward if packed else _gated_forward
    patched, left = [], {}
    for name, m in _mlps(model, model_type):
        if _STATE in m.__dict__:
            patched.append(name)
            continue
        act = getattr(m, attribute, None)
        activation = activation_of(act) if isinstance(act, nn.Module) else None
        if activation is None:
            left.setdefault(type(act).__name__, []).append(name)
            continue
        m.__dict__[_STATE] = (activation, act, attribute)
        m.forward = types.MethodType(forward, m)
        patched.append(name)
    if left:
        warnings.warn(f"patch_mlp: {model_type} MLPs left stock, their activation is not one swiglu implements "
                      "(silu / swish, gelu_pytorch_tanh): " +
                      "; ".join(f"{act} in {len(names)} ({names[0]}, ...)" for act, names in left.items()),
                      stacklevel=2)
    return patched


def unpatch_mlp(model: nn.Module) -> None:
    """The stock forward again in every MLP patch_mlp patched; a no-op where none is."""
    for m in model.modules():
        if m.__dict__.pop(_STATE, None) is not None:
            m.__dict__.pop("forward", None)
