"""`patch(model)` / `unpatch(model)`: the two lines a user adds to a QLoRA script.

patch puts together the pieces of this package on a Hugging Face model, plain or wrapped by
PEFT:

- attention -> flash_attention, per model family (patching/families.py; `attention=False` on
  the others);
- the rest of a training step, per model family where the family has it (patching/families.py
  records which part applies to which `model_type`): loss -> fused_linear_cross_entropy (no
  logits in memory; the *ForCausalLM forward, in training mode with labels), norm -> the fused
  RMSNorm, rope -> the fused rotary embedding of q and k, mlp -> the fused SwiGLU. A part a
  known family does not have (OPT and Bloom: no RMSNorm, no rotary embedding, no gated MLP)
  is reported as not applicable, not as an error;
- `quantize="nf4"`: nn.Linear base layers -> NF4Linear (never lm_head or LoRA's own weights);
- on a model that holds PEFT LoRA layers: bitsandbytes NF4 `Linear4bit` -> NF4Linear (same
  bytes, shared) and the LoRA layers -> the fused lora_linear op (patching/lora.py), in any
  architecture: decoders, encoders (BERT, DistilBERT), GPT-2's Conv1D layers.

Called before `get_peft_model`, the bitsandbytes layers stay `Linear4bit`: PEFT has to see
them to wrap them (it cannot wrap an NF4Linear), and `prepare_model_for_kbit_training` has
to recognise their weights. The LoRA layers PEFT adds later are fused on the model's first
forward, reading the `Linear4bit` bytes in place; calling patch again after
`get_peft_model` converts the layers as well. Each call patches only what is not patched
yet, so patching twice is a no-op. unpatch undoes all of it except `quantize="nf4"`, which
changes weights rather than code paths.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref

import torch
from torch import nn

from ..env import op_backends
from ..modules import NF4Linear
from .families import FAMILIES, PART_MODULES, PART_WHAT, PARTS, SUPPORTED, part_functions, patch_attention, \
    unpatch_attention
from .lora import _lora_classes, patch_lora, unpatch_lora
from .quantize import (
    bnb_linear4bit_layers,
    convert_bnb_layers,
    quantize_model,
    quantize_targets,
    to_bnb,
    why_not_convertible,
)

_REPORT = "_qlora_kernels_patch"

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PatchReport:
    """What patch did to a model (`qlora_kernels.patch_report(model)`)."""

    family: str | None = None
    attention: str | None = None
    quantized: list[str] = dataclasses.field(default_factory=list)  # nn.Linear -> NF4Linear
    converted: list[str] = dataclasses.field(default_factory=list)  # Linear4bit -> NF4Linear
    lora_layers: list[str] = dataclasses.field(default_factory=list)  # fused
    lora_pending: bool = False  # fused at the first forward (patched before get_peft_model)
    skipped: list[str] = dataclasses.field(default_factory=list)
    # what each part of PARTS replaced (names relative to the transformers model)
    loss: list[str] = dataclasses.field(default_factory=list)
    norm: list[str] = dataclasses.field(default_factory=list)
    rope: list[str] = dataclasses.field(default_factory=list)
    mlp: list[str] = dataclasses.field(default_factory=list)
    not_applicable: dict[str, str] = dataclasses.field(default_factory=dict)  # part -> why it does not apply

    def __str__(self) -> str:
        parts = [f"family={self.family}", f"attention={self.attention}", f"quantized={len(self.quantized)}",
                 f"converted from bitsandbytes={len(self.converted)}", f"fused LoRA layers={len(self.lora_layers)}"]
        parts += [f"{part}={len(getattr(self, part))}" for part in PARTS]
        if self.lora_pending:
            parts.append("LoRA layers added later are fused at the first forward")
        if self.not_applicable:
            parts.append("not applicable: " + ", ".join(self.not_applicable))
        if self.skipped:
            parts.append("skipped: " + "; ".join(self.skipped))
        return "qlora_kernels.patch: " + ", ".join(parts)


def _transformers_model(model: nn.Module) -> nn.Module | None:
    """The transformers PreTrainedModel inside `model` (itself, or under PEFT's wrappers)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return None


def _has_lora(model: nn.Module) -> bool:
    try:
        classes = _lora_classes()
    except ImportError:  # no PEFT, no LoRA layers
        return False
    return any(isinstance(m, classes) for m in model.modules())


def _fuse_on_first_forward(root: nn.Module, report: PatchReport) -> None:
    ref = weakref.ref(root)
    handles = []

    def hook(module, args):
        if torch.compiler.is_compiling():  # no module surgery inside a traced graph
            return
        model = ref()
        # PEFT marks the model it injected into (get_peft_model, or transformers' add_adapter):
        # an O(1) test per forward until then, so generate() on a plain model pays nothing
        if model is None or not (hasattr(model, "peft_config") or getattr(model, "_hf_peft_config_loaded", False)):
            return
        if not _has_lora(model):
            return
        fused = patch_lora(model)
        log.info("%d LoRA layers -> lora_linear (fused at the first forward)", len(fused))
        report.lora_layers += fused
        report.lora_pending = False
        for handle in handles:
            handle.remove()

    # not on root itself: a caller may run its .forward() as a method (PEFT's AdaLoRA tuner does),
    # which skips root's own hooks. That forward calls its submodules through __call__, so
    # whichever child runs first fuses, whatever the architecture names its blocks
    handles += [child.register_forward_pre_hook(hook) for child in list(root.children()) or [root]]
    root._qlora_kernels_hooks = handles
    report.lora_pending = True


def _plan_parts(hf: nn.Module | None, model_type: str | None, wanted: dict[str, bool],
                attention: bool) -> tuple[list[str], dict[str, str], list[str]]:
    """The parts to patch on this model, those that do not apply (part -> why) and the skipped
    entry of an unknown model type (at most one)."""
    requested = [part for part in PARTS if wanted[part]]
    family = FAMILIES.get(model_type)
    if family is None:
        if not requested:
            return [], {}, []
        what = f"model_type {model_type!r}" if hf is not None else "a model that is not a transformers model"
        why = f"{what} is not in the registry (known: {', '.join(FAMILIES)})"
        if not attention:  # attention=False: the documented way to patch an architecture of no known family
            return [], {part: why for part in requested}, []
        return [], {}, [f"{', '.join(requested)}: {why}"]
    todo, not_applicable = [], {}
    for part in requested:
        if part in family.parts:
            todo.append(part)
        else:
            covered = ", ".join(PART_MODULES[part].FAMILIES)
            not_applicable[part] = f"{model_type} has no {PART_WHAT[part]} of a kind it replaces (it covers {covered})"
    return todo, not_applicable, []


def patch(model: nn.Module, attention: bool = True, lora: bool = True, quantize: str | None = None,
          strict: bool = True, loss: bool = True, norm: bool = True, rope: bool = True, mlp: bool = True) -> nn.Module:
    """Route `model` (a Hugging Face model, plain or PEFT-wrapped) through qlora_kernels.

    attention: flash_attention in every attention layer, for the model types in SUPPORTED;
        attention=False leaves attention stock and patches the rest on any architecture.
    lora: PEFT LoRA layers -> fused base + LoRA op; their bitsandbytes NF4 bases -> NF4Linear
        (same bytes). Before get_peft_model: fused at the first forward (see the module doc).
    quantize: None, or "nf4" to quantize the nn.Linear base layers (blocksize 64, double
        quant, compute in the layer's dtype). Before get_peft_model this leaves nothing PEFT
        can wrap: for LoRA training call patch after get_peft_model.
    loss, norm, rope, mlp: the fused linear + cross-entropy (the *ForCausalLM forward in
        training mode with labels returns the loss and logits=None), RMSNorm, rotary
        embeddings, SwiGLU MLP, in the families that have them (`FAMILIES[model_type].parts`;
        the others are listed in `patch_report(model).not_applicable`).
    strict: an unsupported architecture or layer raises ValueError before anything changes;
        with strict=False the rest is patched and what was skipped is warned about and listed
        in `patch_report(model).skipped`. An attention call the kernels do not implement
        (attention dropout, a custom 4-D mask, an unknown keyword) runs through SDPA with one
        warning per reason; `patch_attention(model, strict=True)` makes those raise.

    Returns `model`. Patching again changes nothing that is already patched. Layer names in
    the report are relative to the transformers model (PEFT's `get_base_model()`).
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r} is not supported; use None or 'nf4'")
    hf = _transformers_model(model)
    root = hf if hf is not None else model
    report = root.__dict__.get(_REPORT) or PatchReport()
    skipped = []

    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    supported = model_type in SUPPORTED
    if attention and not supported:
        what = f"model_type {model_type!r}" if hf is not None else f"{type(model).__name__} (not a transformers model)"
        skipped.append(f"attention: {what} is not supported; supported: " +
                       ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items()))
        ways_out = ("patch(model, attention=False) keeps stock attention and fuses the LoRA layers, which work on "
                    "any architecture; strict=False patches the rest and warns")
    else:
        ways_out = "strict=False patches the rest and warns"
    wanted = {"loss": loss, "norm": norm, "rope": rope, "mlp": mlp}
    todo, not_applicable, unknown = _plan_parts(hf, model_type, wanted, attention)
    skipped += unknown
    lora_here = lora and _has_lora(root)
    bnb_layers = bnb_linear4bit_layers(root) if lora_here else []
    unconvertible = [(n, why) for n, m in bnb_layers if (why := why_not_convertible(m))]
    skipped += [f"{n}: {why}; left to bitsandbytes" for n, why in unconvertible]
    if skipped and strict:
        raise ValueError("qlora_kernels.patch: " + "; ".join(skipped) + f" ({ways_out})")

    report.family = model_type if supported else report.family
    if attention and supported:
        report.attention = ", ".join(patch_attention(hf))
        log.info("%s: %s attention layers -> flash_attention (%s)", model_type,
                 getattr(hf.config, "num_hidden_layers", "all"), report.attention)
    else:
        log.info("attention left stock (%s)", f"model_type {model_type!r} is not supported" if attention
                 else "attention=False")
    for part in todo:
        patch_part, _ = part_functions(part)
        done = getattr(report, part)
        done += [name for name in patch_part(hf) if name not in done]
        log.info("%s: %s (%d replaced)", part, FAMILIES[model_type].parts[part], len(done))
    for part, why in not_applicable.items():
        report.not_applicable.setdefault(part, why)
        log.info("%s not applicable: %s", part, why)
    targets = quantize_targets(root) if quantize == "nf4" else []
    if targets:
        dtype = targets[0][1].weight.dtype
        compute_dtype = dtype if dtype.is_floating_point and dtype != torch.float64 else torch.bfloat16
        quantize_model(root, compute_dtype=compute_dtype)
        report.quantized += [n for n, _ in targets]
        log.info("%d nn.Linear layers -> NF4Linear (quantized, compute in %s)", len(targets), compute_dtype)
    if lora_here:
        bad = {n for n, _ in unconvertible}
        convertible = [(n, m) for n, m in bnb_layers if n not in bad]
        convert_bnb_layers(root, convertible)
        report.converted += [n for n, _ in convertible]
        if convertible:
            log.info("%d bitsandbytes Linear4bit layers -> NF4Linear (same bytes)", len(convertible))
        fused = patch_lora(root)
        report.lora_layers += fused
        log.info("%d LoRA layers -> lora_linear (base and LoRA in one op)", len(fused))
    elif lora and "_qlora_kernels_hooks" not in root.__dict__:
        _fuse_on_first_forward(root, report)
        log.info("no LoRA layers yet: those PEFT adds are fused at the model's first forward")
    _log_op_backends(root)
    report.skipped += skipped
    if skipped:
        warnings.warn("qlora_kernels.patch skipped: " + "; ".join(skipped), stacklevel=2)
    root.__dict__[_REPORT] = report
    return model


def _log_op_backends(model: nn.Module) -> None:
    # meta tensors run the ops' fake implementations: no backend computes anything there
    for device_type in sorted({p.device.type for p in model.parameters()} - {"meta"}):
        ops = op_backends(device_type)
        log.info("ops on %s: %s", device_type, "; ".join(f"{op} {impl}" for op, impl in ops.items()))


def patch_report(model: nn.Module) -> PatchReport | None:
    """What patch did to `model`, or None if it is not patched."""
    hf = _transformers_model(model)
    return (hf if hf is not None else model).__dict__.get(_REPORT)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch: stock attention, loss, norm, rope and MLP, PEFT's LoRA forward, NF4Linear layers that came from
    bitsandbytes back to Linear4bit (over the same tensors). Layers quantized by
    `patch(quantize="nf4")` stay NF4Linear. Returns `model`; a no-op on an unpatched model."""
    hf = _transformers_model(model)
    root = hf if hf is not None else model
    report = root.__dict__.pop(_REPORT, None)
    if report is None:
        return model
    for handle in root.__dict__.pop("_qlora_kernels_hooks", ()):
        handle.remove()
    unpatch_lora(model)
    for part in reversed(PARTS):
        if hf is not None and getattr(report, part):
            part_functions(part)[1](hf)
    if hf is not None and report.attention is not None:
        unpatch_attention(hf)
    if report.converted:
        to_bnb(model)
    return model


__all__ = ["PatchReport", "SUPPORTED", "patch", "patch_report", "unpatch"]
