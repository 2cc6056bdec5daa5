"""NF4Linear: a frozen 4-bit linear layer whose state dict is bitsandbytes' `Linear4bit`'s."""

from __future__ import annotations

import types

import torch
from torch import nn

from ..bnb_state_dict import state_to_dict, weight_from_state_dict
from ..nf4 import nf4_dequantize, nf4_quantize
from ..nf4_weight import FLOAT_DTYPES, NF4QuantState, NF4Weight
from ..ops import nf4_linear as nf4_linear_ops

_STATE_FIELDS = ("absmax", "code", "offset", "nested_absmax", "nested_code")


class NF4Linear(nn.Module):
    """y = x · dequant(W)ᵀ + bias, W stored as NF4 (optionally double-quantized).

    `weight` is a frozen Parameter holding the packed bytes in `quant_storage`; the quant
    state lives in non-persistent buffers (so `.to(device)` moves it) and is written to /
    read from the state dict under bitsandbytes' keys (`weight.absmax`, ...,
    `weight.quant_state.bitsandbytes__nf4`). Casting the module (`.half()`, `.to(bf16)`)
    never casts the packed bytes or the quant state: only the bias follows.
    """

    # set by from_bnb: how to rebuild the bitsandbytes Linear4bit this layer came from
    bnb_origin: dict | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        packed: torch.Tensor,
        state: NF4QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if compute_dtype not in FLOAT_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype} is not supported; use one of {FLOAT_DTYPES}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self._set_weight(packed, state)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        quant_storage: torch.dtype = torch.uint8,
    ) -> NF4Linear:
        """Quantize an nn.Linear (the bias Parameter is reused as is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        packed, state = nf4_quantize(linear.weight.detach(), blocksize, double_quant, quant_storage)
        return cls(linear.in_features, linear.out_features, packed, state, linear.bias, compute_dtype)

    # -- the quantized weight --------------------------------------------------------

    def _set_weight(self, packed: torch.Tensor, state: NF4QuantState) -> None:
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight has shape {tuple(state.shape)}, expected ({self.out_features}, {self.in_features})"
            )
        NF4Weight(packed, state)
        self.weight = nn.Parameter(packed, requires_grad=False)
        for name in _STATE_FIELDS:
            self.register_buffer(name, getattr(state, name), persistent=False)
        self._state = state
        self._storage = packed.dtype

    @property
    def quant_state(self) -> NF4QuantState:
        """The layer's quant state, checked once: rebuilt (and checked again) only when a move
        (`.to(device)`) or a load replaced one of its buffers."""
        storage = self._storage
        if self.weight.dtype != storage:
            # a bf16 -> fp16 cast keeps the byte count and would silently scramble the codes
            raise TypeError(
                f"NF4Linear: the packed 4-bit weight is stored as {storage} but is now {self.weight.dtype}: something "
                "cast its bytes as if they were numbers (e.g. FSDP2 MixedPrecisionPolicy(param_dtype=...), or peft's "
                f"prepare_model_for_kbit_training run after quantizing). Use param_dtype=None or {storage} (the quant "
                "storage), or quant_storage=torch.uint8, which FSDP never casts"
            )
        state = self._state
        if any(getattr(self, n) is not getattr(state, n) for n in _STATE_FIELDS):
            state = self._state = state.with_tensors(**{n: getattr(self, n) for n in _STATE_FIELDS
                                                         if getattr(self, n) is not None})
        return state

    @property
    def nf4_weight(self) -> NF4Weight:
        """The packed weight and its state as one `NF4Weight` (what `lora_linear` takes)."""
        return NF4Weight(self.weight, self.quant_state)

    @property
    def quant_storage(self) -> torch.dtype:
        return self.weight.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4_dequantize(self.weight, self.quant_state, dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by NF4(`weight`) with this layer's blocksize, double
        quant, quant storage and dtype (a LoRA merge: lossy, as bitsandbytes' is)."""
        s = self.quant_state
        if tuple(weight.shape) != tuple(s.shape):
            raise ValueError(f"requantize_: weight shape {tuple(weight.shape)}, layer {tuple(s.shape)}")
        packed, state = nf4_quantize(weight.to(s.dtype), s.blocksize, s.double_quant, self.quant_storage)
        self._set_weight(packed.to(self.weight.device), state.to(self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the nf4_linear op: the GEMV for a few tokens, W in reused tiles or a workspace above
        # (never a fresh dequantized W per call), in compute_dtype
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the layer expects {self.in_features}")
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        x2d = x.to(self.compute_dtype).reshape(-1, self.in_features).contiguous()
        weight = self.nf4_weight
        y = nf4_linear_ops.direct_inference(x2d, weight, bias)
        if y is None:
            y = nf4_linear_ops.nf4_linear(x2d, *weight.op_args(), self.out_features, bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    # -- casting and the state dict ------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would reinterpret packed bytes and cast absmax codes:
        # quantized tensors only follow device moves.
        protected = {id(self.weight)} | {id(getattr(self, n)) for n in _STATE_FIELDS if getattr(self, n) is not None}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in protected:
                return fn(t)
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(keep_dtype, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        entries = state_to_dict(self.quant_state)
        for key, value in entries.items():
            destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()
        # torch.distributed.checkpoint's get_model_state_dict resolves every key by getattr
        # along its dotted path ("weight.absmax" -> layer.weight.absmax), which bitsandbytes'
        # Params4bit allows. FSDP2 registers Parameter objects of its own, so the one in place
        # now gets the attributes, as the state dict is written (before that lookup).
        for key, value in entries.items():
            head, _, tail = key.partition(".")
            setattr(self.weight, head, types.SimpleNamespace(**{tail: value}) if tail else value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            # Everything is parsed and checked before the layer changes: a bad entry raises
            # and leaves the layer as it was.
            packed, state = weight_from_state_dict(state_dict, key, (self.out_features, self.in_features))
            device = self.weight.device
            bias = state_dict.get(prefix + "bias")
            if self.bias is not None and isinstance(bias, torch.Tensor) and bias.shape != self.bias.shape:
                raise ValueError(f"{prefix}bias: checkpoint shape {tuple(bias.shape)}, layer {tuple(self.bias.shape)}")
            # copies, as load_state_dict always does: the layer never aliases the caller's dict
            state = state.with_tensors(**{k: v.to(device, copy=True) for k, v in state.tensors().items()})
            self._set_weight(packed.to(device, copy=True), state)
        rest = {k: v for k, v in state_dict.items() if not k.startswith(key)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={s.blocksize}, double_quant={s.double_quant}, quant_storage={self.quant_storage}, "
            f"compute_dtype={self.compute_dtype}"
        )


def check_nf4_entries(module: nn.Module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook for a model holding NF4Linear layers: checks every NF4
    weight's entries before any layer loads, so a bad checkpoint leaves the model untouched
    (torch loads module by module and would otherwise stop half-way)."""
    for name, layer in module.named_modules():
        key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
        if isinstance(layer, NF4Linear) and key in state_dict:
            weight_from_state_dict(state_dict, key, (layer.out_features, layer.in_features))


def guard_model_loading(model: nn.Module) -> None:
    """Install `check_nf4_entries` on `model` once."""
    if not getattr(model, "_qlora_kernels_load_guard", False):
        model.register_load_state_dict_pre_hook(check_nf4_entries)
        model._qlora_kernels_load_guard = True
