"""Run PEFT's LoRA layers through the fused `lora_linear` op, on the same Parameters.

Patched, in any architecture: PEFT `lora.Linear` (over nn.Linear, our NF4Linear, or a GPT-2
style `Conv1D`, whose [in, out] weight goes to the op as its transpose, a view) and PEFT's
bitsandbytes `Linear4bit` LoRA layer (over an NF4 `Linear4bit`, its bytes read in place). The
layer keeps its PEFT class and Parameters: adapter switching, `disable_adapter()`, merging,
saving work as before. A call the kernel does not cover (several active adapters, mixed-batch
adapter names, DoRA and other variants, a trainable base weight, merged weights) takes PEFT's
own forward; combinations that are a configuration rather than a mode (several adapters,
variants) warn once.

PEFT merges into a dense or bitsandbytes base by itself; into an NF4Linear base the patched
layer merges as bitsandbytes does: dequantize, add the LoRA delta, requantize (lossy).
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from ..lora import lora_linear
from ..modules import NF4Linear
from .quantize import _bnb_quant_state, nf4_state_from_bnb

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
    """(packed, NF4QuantState) of an NF4 Linear4bit, or None for FP4 or the CPU inference layout.
    The state is checked once and kept on the layer until bitsandbytes replaces one of its
    tensors (a move to another device)."""
    qs = _bnb_quant_state(base)
    if qs is None or qs.quant_type != "nf4" or getattr(qs, "packing_format_for_cpu", False):
        return None
    state = getattr(base, "_qlora_kernels_state", None)
    nested = qs.state2
    current = (qs.absmax, qs.code, qs.offset if nested else None, nested.absmax if nested else None)
    if state is None or any(a is not b for a, b in zip(current, (state.absmax, state.code, state.offset,
                                                                  state.nested_absmax))):
        state = base._qlora_kernels_state = nf4_state_from_bnb(qs)
    return base.weight.data, state


def _is_conv1d(base) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return type(base) is Conv1D


def _base_weight(base):
    """(weight argument of lora_linear, compute dtype or None for x's) or None when not fusable."""
    if isinstance(base, NF4Linear):
        return base, base.compute_dtype
    if type(base) is nn.Linear:
        return (None if base.weight.requires_grad else base.weight), None
    if _is_conv1d(base):  # y = x·W + b with W stored [in, out] (PEFT's fan_in_fan_out)
        return (None if base.weight.requires_grad else base.weight.t()), None
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
    base = self.get_base_layer()
    resolved = _base_weight(base) if plain and len(active) == 1 else None
    dropout = self.lora_dropout[active[0]] if active else None
    if (resolved is None or resolved[0] is None or active[0] in self.lora_variant
            or not isinstance(dropout, (nn.Dropout, nn.Identity))):
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


def _nf4_merge_adapters(self, adapters: list[str], sign: float, safe_merge: bool) -> None:
    base = self.get_base_layer()
    for adapter in adapters:
        if adapter in self.lora_variant or self.lora_B[adapter].bias is not None:
            raise NotImplementedError(f"merging adapter {adapter!r} (a LoRA variant or lora_bias) into an NF4Linear "
                                      "base is not supported")
        weight = base.dequantize(torch.float32) + sign * self.get_delta_weight(adapter).float()
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights; the adapter {adapter!r} seems to be broken")
        base.requantize_(weight)


def _merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
    if not isinstance(self.get_base_layer(), NF4Linear):
        return type(self).merge(self, safe_merge=safe_merge, adapter_names=adapter_names)
    from peft.tuners.tuners_utils import check_adapters_to_merge

    adapters = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
    _nf4_merge_adapters(self, adapters, 1.0, safe_merge)
    self.merged_adapters.extend(adapters)


def _unmerge(self) -> None:
    if not isinstance(self.get_base_layer(), NF4Linear):
        return type(self).unmerge(self)
    while self.merged_adapters:
        adapter = self.merged_adapters[-1]
        _nf4_merge_adapters(self, [adapter], -1.0, False)
        self.merged_adapters.pop()


_METHODS = {"forward": _fused_forward, "merge": _merge, "unmerge": _unmerge}


def patch_lora(model: nn.Module) -> list[str]:
    """Route the PEFT LoRA layers of `model` through the fused op; returns their names."""
    classes = _lora_classes()
    patched = []
    for name, module in model.named_modules():
        if isinstance(module, classes) and "forward" not in module.__dict__:
            for attr, fn in _METHODS.items():
                setattr(module, attr, types.MethodType(fn, module))
            patched.append(name)
    return patched


def unpatch_lora(model: nn.Module) -> None:
    """Give every patched LoRA layer its PEFT methods back."""
    for module in model.modules():
        for attr, fn in _METHODS.items():
            if getattr(module.__dict__.get(attr), "__func__", None) is fn:
                delattr(module, attr)
