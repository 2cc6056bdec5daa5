"""A causal LM's training loss through `qlora_kernels.fused_linear_cross_entropy`: no logits.

`patch_loss(model)` gives the `*ForCausalLM` instance an instance attribute `forward` (its class
is untouched: another model in the process stays stock, and FSDP2's class swap keeps the patch).
A call takes the fused path when the model is in training mode, `labels` are given (as
transformers computes a loss only then), the output is a ModelOutput (`return_dict` not False),
`logits_to_keep` is 0 and the model's loss function is transformers' `ForCausalLMLoss`:

* the stock forward runs with `labels=None` and every other argument as given, so the base model,
  its cache, hidden states and attentions are exactly stock; a forward pre-hook on `lm_head`, held
  for that call only, takes the last hidden states it receives and hands `lm_head` an empty
  sequence instead, so no logits are computed;
* the labels are shifted as `ForCausalLMLoss` does (padded with ignore_index on the right, then
  shifted one left; `shift_labels` when given instead), and the loss is
  `fused_linear_cross_entropy(hidden, lm_head.weight, shift_labels, lm_head.bias, ignore_index=...,
  softcap=<final_logit_softcapping for Gemma2 / Gemma3>, num_items_in_batch=...)`, with the
  `num_items_in_batch` and `ignore_index` the Trainer or the caller passed;
* the result is the model's usual output class with that loss and **`logits=None`** (the point:
  the [batch, seq, vocab] logits are never made); its other fields are the stock forward's.

Any other call runs the stock forward unchanged (evaluation, generation, no labels, a forward
traced by torch.compile). The fused
path needs a plain `lm_head` weight: a `torch.nn.Linear` with nn.Linear's own forward and a dense
float weight. `patch_loss` on a model whose `lm_head` is anything else (a PEFT LoRA layer on the
head, bitsandbytes' Linear4bit, NF4Linear, a sharded DTensor weight) patches nothing, warns once
and returns []; if the head is replaced after patching, each call runs stock (one warning).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings

import torch
from torch import nn

from ..loss import fused_linear_cross_entropy

# model_type -> what the loss patch replaces there
FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM lm_head + ForCausalLMLoss -> fused_linear_cross_entropy (training with labels)",
    "mistral": "MistralForCausalLM lm_head + ForCausalLMLoss -> fused_linear_cross_entropy (training with labels)",
    "qwen2": "Qwen2ForCausalLM lm_head + ForCausalLMLoss -> fused_linear_cross_entropy (training with labels)",
    "qwen3": "Qwen3ForCausalLM lm_head + ForCausalLMLoss -> fused_linear_cross_entropy (training with labels)",
    "gemma": "GemmaForCausalLM lm_head + ForCausalLMLoss -> fused_linear_cross_entropy (training with labels)",
    "gemma2": "Gemma2ForCausalLM lm_head + final_logit_softcapping + ForCausalLMLoss -> fused_linear_cross_entropy "
              "with softcap (training with labels)",
    "gemma3_text": "Gemma3ForCausalLM lm_head + final_logit_softcapping + ForCausalLMLoss -> "
                   "fused_linear_cross_entropy with softcap (training with labels)",
    "phi3": "Phi3ForCausalLM lm_head + ForCausalLMLoss -> fused_linear_cross_entropy (training with labels)",
    "opt": "OPTForCausalLM lm_head + ForCausalLMLoss -> fused_linear_cross_entropy (training with labels)",
    "bloom": "BloomForCausalLM lm_head + ForCausalLMLoss -> fused_linear_cross_entropy (training with labels)",
}

# the families whose forward applies config.final_logit_softcapping to the logits
_SOFTCAP_FAMILIES = ("gemma2", "gemma3_text")

_STATE = "_qlora_kernels_loss_patch"


@dataclasses.dataclass
class _Patch:
    stock_forward: object  # what `model.forward` was (bound), called for every stock run
    instance_forward: object  # the instance attribute `forward` before patching, or None
    parameters: tuple[str, ...]  # the stock forward's parameter names, to name positional arguments
    softcap: bool
    head_warned: bool = False


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None)


def unusable_head(head) -> str | None:
    """Why `head` (a model's lm_head) cannot feed the fused op, or None when it can."""
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"lm_head is a {type(head).__name__}, not a plain torch.nn.Linear"
    weight = head.weight
    if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.dtype.is_floating_point:
        return f"lm_head's weight is a {type(weight).__name__} of {weight.dtype}, not a dense float tensor"
    return None


def _forward(self, *args, **kwargs):
    patch: _Patch | None = self.__dict__.get(_STATE)
    if patch is None:
        # unpatched while a wrapper installed later (TRL's fused LM head, accelerate's autocast)
        # still calls this function: the class's forward
        return type(self).forward(self, *args, **kwargs)
    if args:
        if len(args) > len(patch.parameters) or any(name in kwargs for name in patch.parameters[:len(args)]):
            return patch.stock_forward(*args, **kwargs)  # stock raises what it raises
        kwargs.update(zip(patch.parameters, args))
    labels = kwargs.get("labels")
    # the fused path holds a hook on lm_head for the call, which torch.compile cannot trace
    # (registering it mutates torch's handle counter): a compiled forward keeps the stock loss
    if (labels is None or not self.training or kwargs.get("return_dict") is False or torch.compiler.is_compiling()
            or not _keeps_every_position(kwargs.get("logits_to_keep", 0)) or not _stock_loss(self)):
        return patch.stock_forward(**kwargs)
    head = self.get_output_embeddings()
    reason = unusable_head(head)
    if reason is not None:
        if not patch.head_warned:
            patch.head_warned = True
            warnings.warn(f"qlora_kernels: the fused loss is off for this model ({reason}); the stock loss runs",
                          stacklevel=2)
        return patch.stock_forward(**kwargs)

    captured = []

    def take_hidden(module, inputs):
        (hidden,) = inputs
        captured.append(hidden)
        return (hidden[..., :0, :],)

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        output = patch.stock_forward(**dict(kwargs, labels=None))
    finally:
        handle.remove()
    if len(captured) != 1 or not hasattr(output, "keys"):
        raise RuntimeError(f"qlora_kernels: the fused loss expected {type(self).__name__}'s forward to call lm_head "
                           f"once and return a ModelOutput; unpatch_loss(model) runs the stock loss")
    (hidden,) = captured
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        # ForCausalLMLoss: pad with ignore_index on the right, then shift so that tokens < n predict n
        padded = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if shift_labels.numel() != hidden.shape[:-1].numel():
        raise ValueError(f"labels of shape {tuple(shift_labels.shape)} do not match the {tuple(hidden.shape[:-1])} "
                         f"positions of the hidden states")
    softcap = getattr(self.config, "final_logit_softcapping", None) if patch.softcap else None
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):
        # what autocast makes of lm_head's linear: inputs in the autocast dtype
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    loss = fused_linear_cross_entropy(hidden, weight, shift_labels.reshape(hidden.shape[:-1]), bias,
                                      ignore_index=ignore_index, softcap=softcap,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
    fields = {name: value for name, value in output.items() if name not in ("loss", "logits")}
    return type(output)(loss=loss, logits=None, **fields)


def _keeps_every_position(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep == 0


def _stock_loss(model) -> bool:
    from transformers.loss.loss_utils import ForCausalLMLoss

    return model.loss_function is ForCausalLMLoss


def patch_loss(model: nn.Module) -> list[str]:
    """Route `model`'s training loss through fused_linear_cross_entropy (module docstring).

    `model` is the transformers `*ForCausalLM` (not a PEFT wrapper). Returns the name of the head
    whose logits are no longer made (["lm_head"]), or [] with one warning when its lm_head cannot
    be used; patching twice is a no-op. Raises NotImplementedError for a model_type not in FAMILIES.
    """
    model_type = _model_type(model)
    if model_type not in FAMILIES:
        raise NotImplementedError(f"the fused loss knows the model types {sorted(FAMILIES)}; got {model_type!r} "
                                  f"({type(model).__name__})")
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), "lm_head")
    if _STATE in model.__dict__:
        return [name]
    reason = unusable_head(head)
    if reason is not None:
        warnings.warn(f"qlora_kernels: the fused loss is not patched into {type(model).__name__} ({reason}); its "
                      f"stock loss runs", stacklevel=2)
        return []
    stock = model.forward
    parameters = tuple(p.name for p in inspect.signature(stock).parameters.values()
                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    model.__dict__[_STATE] = _Patch(stock_forward=stock, instance_forward=model.__dict__.get("forward"),
                                    parameters=parameters, softcap=model_type in _SOFTCAP_FAMILIES)
    model.forward = types.MethodType(_signed_like(stock), model)
    return [name]


def _signed_like(stock):
    """_forward under the stock forward's name, docstring and signature: the Trainer keeps only
    the dataset columns that the forward's signature names, and generate() validates its model
    kwargs against it. Bound to the model as a method, as accelerate expects (it rewraps
    forward.__func__)."""

    def forward(self, *args, **kwargs):
        return _forward(self, *args, **kwargs)

    functools.update_wrapper(forward, getattr(stock, "__func__", stock))
    forward.__qlora_kernels_loss__ = True
    return forward


def _is_ours(forward) -> bool:
    return getattr(getattr(forward, "__func__", None), "__qlora_kernels_loss__", False)


def unpatch_loss(model: nn.Module) -> None:
    """The stock forward again (the instance attribute it had before, or none); no-op if not patched."""
    patch = model.__dict__.pop(_STATE, None)
    if patch is None:
        return
    current = model.__dict__.get("forward")
    if not _is_ours(current):
        return  # wrapped again since (TRL, accelerate): the wrapper stays and reaches the stock forward
    if patch.instance_forward is None:
        del model.__dict__["forward"]
    else:
        model.forward = patch.instance_forward
