"""nn.Linear -> NF4Linear (quantize_model) and bitsandbytes Linear4bit -> NF4Linear (from_bnb)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modules import NF4Linear
from ..modules.nf4_linear import guard_model_loading
from ..nf4 import NF4QuantState

DEFAULT_SKIP = ("lm_head",)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    # A skip entry names a module by its last name(s) ("lm_head", "mlp.down_proj"), as
    # transformers' llm_int8_skip_modules does. PEFT's trainable pieces (lora_A / lora_B /
    # lora_embedding_*, modules_to_save copies) are never base weights.
    parts = name.split(".")
    if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
        return True
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_targets(model: nn.Module, skip_modules: Iterable[str] = ()) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers quantize_model would replace (inside PEFT LoRA layers: their base)."""
    skip = tuple(DEFAULT_SKIP) + tuple(skip_modules)
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)]


def quantize_model(
    model: nn.Module,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_storage: torch.dtype = torch.uint8,
    skip_modules: Iterable[str] = (),
    progress: bool = True,
) -> nn.Module:
    """Replace every `nn.Linear` (except `lm_head` and `skip_modules`) by an NF4Linear, in place.

    For a transformers model the config gets the matching `BitsAndBytesConfig`, so
    `save_pretrained` writes a checkpoint that stock transformers + bitsandbytes load.
    Loading a state dict into the model checks every NF4 entry before any layer changes.
    Returns the model.
    """
    skip = tuple(DEFAULT_SKIP) + tuple(skip_modules)
    targets = quantize_targets(model, skip_modules)
    for name, linear in tqdm(targets, desc="nf4 quantize", unit="layer", disable=not progress or not targets):
        _set_submodule(model, name, NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype, quant_storage))
    guard_model_loading(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config.quantization_config = _bnb_config(blocksize, double_quant, compute_dtype, quant_storage, skip)
    return model


def _bnb_config(blocksize, double_quant, compute_dtype, quant_storage, skip):
    # BitsAndBytesConfig has no blocksize field: loading reads it from each weight's
    # quant state, so any blocksize round-trips.
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=list(skip),
    )


def bnb_linear4bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every bitsandbytes Linear4bit in `model`; [] without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def from_bnb(model: nn.Module, progress: bool = True) -> nn.Module:
    """Turn the bitsandbytes NF4 `Linear4bit` layers of `model` into NF4Linear, in place.

    The packed weight, the quant-state tensors and the bias are shared, not copied and not
    requantized. Works on a model loaded with `BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4")`, also inside a PEFT model (the LoRA layers' base_layer).
    Every layer is checked before the first one is replaced.
    """
    targets = bnb_linear4bit_layers(model)
    for name, layer in targets:
        unsupported = why_not_convertible(layer)
        if unsupported:
            raise NotImplementedError(f"{name}: {unsupported}")
    convert_bnb_layers(model, targets, progress)
    return model


def convert_bnb_layers(model: nn.Module, targets: list[tuple[str, nn.Module]], progress: bool = False) -> None:
    """Replace the given (name, Linear4bit) layers of `model`, each convertible, by NF4Linear."""
    for name, layer in tqdm(targets, desc="from bitsandbytes", unit="layer", disable=not progress or not targets):
        _set_submodule(model, name, _from_linear4bit(layer))
    guard_model_loading(model)


def why_not_convertible(layer) -> str | None:
    """Why a bitsandbytes Linear4bit cannot become an NF4Linear, or None when it can."""
    qs = _bnb_quant_state(layer)
    if qs is None:
        return "Linear4bit is not quantized yet (move it to a device first)"
    if qs.quant_type != "nf4":
        return f"quant_type {qs.quant_type!r} is not supported, only 'nf4'"
    if getattr(qs, "packing_format_for_cpu", False):
        return "bitsandbytes' CPU-repacked inference layout is not supported"
    return None


def _bnb_quant_state(layer):
    # under FSDP the Parameter loses its attributes; Linear4bit keeps a copy on the module
    return getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)


def _from_linear4bit(layer) -> NF4Linear:
    state = nf4_state_from_bnb(_bnb_quant_state(layer))
    compute_dtype = layer.compute_dtype or torch.float32
    nf4 = NF4Linear(layer.in_features, layer.out_features, layer.weight.data, state, layer.bias, compute_dtype)
    # what to_bnb needs to rebuild an identical Linear4bit
    nf4.bnb_origin = {"compute_dtype": layer.compute_dtype, "compute_type_is_set": layer.compute_type_is_set}
    return nf4


def to_bnb(model: nn.Module) -> nn.Module:
    """Inverse of from_bnb: every NF4Linear that from_bnb made becomes a bitsandbytes
    Linear4bit again, over the NF4Linear's current tensors (shared, not copied)."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear) and m.bnb_origin is not None]
    for name, layer in targets:
        _set_submodule(model, name, _to_linear4bit(layer))
    return model


def _to_linear4bit(layer: NF4Linear) -> nn.Module:
    import bitsandbytes as bnb

    s = layer.quant_state
    qs = bnb_state_from_nf4(s)
    out = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False,
                            compute_dtype=layer.bnb_origin["compute_dtype"], compress_statistics=s.double_quant,
                            quant_type="nf4", quant_storage=layer.quant_storage, device="meta")
    out.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_state=qs, blocksize=s.blocksize,
                                   compress_statistics=s.double_quant, quant_type="nf4",
                                   quant_storage=layer.quant_storage, module=out, bnb_quantized=True)
    out.bias = layer.bias
    out.quant_state = qs
    out.compute_type_is_set = layer.bnb_origin["compute_type_is_set"]
    out.train(layer.training)
    return out


def bnb_state_from_nf4(s: NF4QuantState):
    """An NF4QuantState as bitsandbytes' QuantState sharing its tensors (nf4_state_from_bnb's inverse)."""
    from bitsandbytes.functional import QuantState

    nested = None
    if s.double_quant:
        nested = QuantState(absmax=s.nested_absmax, code=s.nested_code, blocksize=s.nested_blocksize,
                            dtype=torch.float32)
    return QuantState(absmax=s.absmax, shape=torch.Size(s.shape), code=s.code, blocksize=s.blocksize,
                      quant_type="nf4", dtype=s.dtype, offset=s.offset if s.double_quant else None, state2=nested)


def nf4_state_from_bnb(qs) -> NF4QuantState:
    """bitsandbytes' NF4 QuantState as an NF4QuantState sharing its tensors."""
    nested = qs.state2
    return NF4QuantState(
        absmax=qs.absmax, shape=torch.Size(qs.shape), dtype=qs.dtype, blocksize=qs.blocksize, code=qs.code,
        offset=qs.offset if nested is not None else None,
        nested_absmax=nested.absmax if nested is not None else None,
        nested_code=nested.code if nested is not None else None,
        nested_blocksize=nested.blocksize if nested is not None else 256,
    )
