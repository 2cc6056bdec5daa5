"""Rotary embeddings of the attention layers through `qlora_kernels.apply_rotary`.

Each family's attention forward calls its modeling module's `apply_rotary_pos_emb`. The patch
gives every attention module of one model a forward of its own: a copy of the stock class
forward function whose globals are a copy of its module's, with `apply_rotary_pos_emb`
replaced (decorators such as transformers' `deprecate_kwarg` are copied around it, each
holding the copy it wraps). Nothing in transformers' modules or classes changes, so another
model in the same process stays stock; the copy is bound to the instance, so gradient
checkpointing, PEFT (which wraps the projections inside) and FSDP2's class swap (a subclass of
the stock class, the instance dict kept) keep it. The globals are copied when the first model
of a family is patched: names rebound in the modeling module afterwards are not seen by
patched modules.

Where accelerate's hooks already replaced an attention module's forward (device_map
offloading), the stock forward they call (`_old_forward`) is the one replaced; any other
instance forward is refused with NotImplementedError rather than overwritten.
"""

from __future__ import annotations

import importlib
import inspect
import types

from torch import nn

from ..rope import apply_rotary

# transformers model_type -> (modeling module, attention class)
_ATTENTION = {
    "llama": ("llama", "LlamaAttention"),
    "mistral": ("mistral", "MistralAttention"),
    "qwen2": ("qwen2", "Qwen2Attention"),
    "qwen3": ("qwen3", "Qwen3Attention"),
    "gemma": ("gemma", "GemmaAttention"),
    "gemma2": ("gemma2", "Gemma2Attention"),
    "gemma3_text": ("gemma3", "Gemma3Attention"),
    "phi3": ("phi3", "Phi3Attention"),
}

FAMILIES: dict[str, str] = {
    "llama": "LlamaAttention: apply_rotary_pos_emb -> qlora_kernels.apply_rotary (q and k in one kernel, GQA)",
    "mistral": "MistralAttention: apply_rotary_pos_emb -> qlora_kernels.apply_rotary",
    "qwen2": "Qwen2Attention: apply_rotary_pos_emb -> qlora_kernels.apply_rotary",
    "qwen3": "Qwen3Attention: apply_rotary_pos_emb -> qlora_kernels.apply_rotary (after q_norm / k_norm)",
    "gemma": "GemmaAttention: apply_rotary_pos_emb -> qlora_kernels.apply_rotary",
    "gemma2": "Gemma2Attention: apply_rotary_pos_emb -> qlora_kernels.apply_rotary",
    "gemma3_text": "Gemma3Attention: apply_rotary_pos_emb -> qlora_kernels.apply_rotary (local and global "
                   "rotary tables alike)",
    "phi3": "Phi3Attention: apply_rotary_pos_emb -> qlora_kernels.apply_rotary (partial rotary: the rest of "
            "the head dim passes through)",
}

_NAME = "apply_rotary_pos_emb"
# on a patched module: (attribute replaced, what it held before, or _MISSING)
_PREVIOUS = "_qlora_kernels_rope_previous"
_MISSING = object()
# on the functions the patch builds
_MARK = "_qlora_kernels_rope"
# stock class forward -> its copy calling apply_rotary (one per class, shared by every model)
_PATCHED_FORWARDS: dict = {}


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) as the patched
    attention forwards call it: `qlora_kernels.apply_rotary`."""
    return apply_rotary(q, k, cos, sin, unsqueeze_dim)


def _family_class(model: nn.Module) -> type:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(f"{type(model).__name__}: rotary-embedding patching supports the model types "
                                  f"{', '.join(FAMILIES)}, not {model_type!r}")
    module_name, class_name = _ATTENTION[model_type]
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return getattr(modeling, class_name)


def _with_rotary(fn: types.FunctionType) -> types.FunctionType:
    """A copy of `fn` (and of each decorator around it, through __wrapped__) whose innermost
    function finds our apply_rotary_pos_emb among its globals."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        stock = fn.__globals__.get(_NAME)
        if stock is None or list(inspect.signature(stock).parameters) != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
            raise NotImplementedError(f"{fn.__qualname__} does not call {_NAME}(q, k, cos, sin, unsqueeze_dim) from "
                                      f"its module: a transformers release this patch does not know")
        new_globals = dict(fn.__globals__)
        new_globals[_NAME] = apply_rotary_pos_emb
        closure = fn.__closure__
        replaced = None
    else:
        replaced = _with_rotary(inner)
        cells = [i for i, c in enumerate(fn.__closure__ or ()) if c.cell_contents is inner]
        if len(cells) != 1:
            raise NotImplementedError(f"{fn.__qualname__}: a decorator that does not hold the function it wraps")
        closure = tuple(types.CellType(replaced) if i == cells[0] else c for i, c in enumerate(fn.__closure__))
        new_globals = fn.__globals__
    new = types.FunctionType(fn.__code__, new_globals, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    if replaced is not None:
        new.__wrapped__ = replaced
    setattr(new, _MARK, True)
    return new


def _patched_forward(cls: type) -> types.FunctionType:
    stock = cls.forward
    if stock not in _PATCHED_FORWARDS:
        _PATCHED_FORWARDS[stock] = _with_rotary(stock)
    return _PATCHED_FORWARDS[stock]


def _is_ours(method) -> bool:
    return getattr(getattr(method, "__func__", None), _MARK, False)


def _target(module: nn.Module, cls: type) -> str:
    """The attribute holding the forward to replace: `forward`, or accelerate's `_old_forward`."""
    own = module.__dict__
    if "forward" not in own or _is_ours(own["forward"]):
        return "forward"
    old = own.get("_old_forward")
    if getattr(module, "_hf_hook", None) is not None and old is not None and (
            getattr(old, "__func__", None) is cls.forward or _is_ours(old)):
        return "_old_forward"
    raise NotImplementedError(f"{type(module).__name__} already has a forward of its own ({own['forward']!r}); "
                              "rotary-embedding patching replaces only the stock one")


def _attentions(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


def patch_rope(model: nn.Module) -> list[str]:
    """Route the rotary embeddings of `model` (a transformers model of a family in FAMILIES,
    not a PEFT wrapper) through `qlora_kernels.apply_rotary`; returns what was replaced.
    Patching twice is a no-op."""
    cls = _family_class(model)
    forward = _patched_forward(cls)
    modules = _attentions(model, cls)
    for m in modules:
        attr = _target(m, cls)
        if _is_ours(m.__dict__.get(attr)):
            continue
        m.__dict__[_PREVIOUS] = (attr, m.__dict__.get(attr, _MISSING))
        setattr(m, attr, types.MethodType(forward, m))
    return [f"{cls.__name__}.{_NAME} x{len(modules)}"] if modules else []


def unpatch_rope(model: nn.Module) -> None:
    """Stock rotary embeddings again (the instances' forwards as they were); no-op if not patched."""
    cls = _family_class(model)
    for m in _attentions(model, cls):
        previous = m.__dict__.pop(_PREVIOUS, None)
        if previous is None:
            continue
        attr, value = previous
        if value is _MISSING:
            m.__dict__.pop(attr, None)
        else:
            m.__dict__[attr] = value
