"""Run PEFT's LoRA layers through the fused `lora_linear` op, on the same Parameters.

Patched: PEFT `lora.Linear` (over nn.Linear or our NF4Linear) and PEFT's bitsandbytes
`Linear4bit` LoRA layer (over an NF4 `Linear4bit`, its bytes read in place). The layer keeps
its PEFT class and Parameters: adapter switching, `disable_adapter()`, merging, saving work
as before. A call the kernel does not cover (several active adapters, mixed-batch adapter
names, DoRA and other variants, fan_in_fan_out, a trainable base weight, merged weights)
takes PEFT's own forward; combinations that are a configuration rather than a mode
(several adapters, variants, fan_in_fan_out) warn once.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from ..lora import lora_linear
from ..modules import NF4Linear
from .quantize import nf4_state_from_bnb

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"qlora_kernels: {message}; using PEFT's forward for such calls", stacklevel=3)


def _lora_classes():
    from peft.tuners.lora import layer as lora_layer

    classes = [lora_layer.Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # bitsandbytes missing: PEFT defines no such class
        return tuple(classes)
    return (*classes, LoraLinear4bit)


def _bnb_state(base):
    """(packed, NF4QuantState) of an NF4 Linear4bit, or None for FP4 or the CPU inference layout."""
    qs = getattr(base.weight, "quant_state", None)
    if qs is None or qs.quant_type != "nf4" or getattr(qs, "packing_format_for_cpu", False):
        return None
    return base.weight.data, nf4_state_from_bnb(qs)


def _base_weight(base):
    """(weight argument of lora_linear, compute dtype or None for x's) or None when not fusable."""
    if isinstance(base, NF4Linear):
        return base, base.compute_dtype
    if type(base) is nn.Linear:
        return (None if base.weight.requires_grad else base.weight), None
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        state = _bnb_state(base)
        return (state, base.compute_dtype) if state is not None else None
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    plain = not args and not kwargs and not self.disable_adapters and not self.merged
    active = [a for a in self.active_adapters if a in self.lora_A]
    if plain and len(active) > 1:
        _warn_once("multi", "several active LoRA adapters are not fused")
    if plain and len(active) == 1 and active[0] in self.lora_variant:
        _warn_once("variant", f"LoRA variant {type(self.lora_variant[active[0]]).__name__} is not fused")
    if plain and getattr(self, "fan_in_fan_out", False):
        _warn_once("fan_in_fan_out", "fan_in_fan_out (Conv1D) weights are not fused")
    base = self.get_base_layer()
    resolved = _base_weight(base) if plain and len(active) == 1 else None
    dropout = self.lora_dropout[active[0]] if active else None
    if (resolved is None or resolved[0] is None or active[0] in self.lora_variant
            or getattr(self, "fan_in_fan_out", False) or not isinstance(dropout, (nn.Dropout, nn.Identity))):
        return type(self).forward(self, x, *args, **kwargs)
    weight, compute_dtype = resolved
    adapter = active[0]
    lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
    scaling = self.scaling[adapter]
    bias = base.bias
    if lora_B.bias is not None:  # lora_bias: B's bias is scaled with the rest of the branch
        bias = scaling * lora_B.bias if bias is None else bias + scaling * lora_B.bias
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    dtype = compute_dtype or x.dtype
    y = lora_linear(x.to(dtype), weight, bias, lora_A.weight, lora_B.weight, scaling, p, dropout.training)
    return y.to(x.dtype)


def patch_lora(model: nn.Module) -> list[str]:
    """Route the PEFT LoRA layers of `model` through the fused op; returns their names."""
    classes = _lora_classes()
    patched = []
    for name, module in model.named_modules():
        if isinstance(module, classes) and "forward" not in module.__dict__:
            module.forward = types.MethodType(_fused_forward, module)
            patched.append(name)
    return patched


def unpatch_lora(model: nn.Module) -> None:
    """Give every patched LoRA layer its PEFT forward back."""
    for module in model.modules():
        if module.__dict__.get("forward") is not None and getattr(module.forward, "__func__", None) is _fused_forward:
            del module.forward
