"""qlora_kernels: fast, lean QLoRA fine-tuning and 4-bit inference kernels.

Public API
----------
patch(model, attention=True, lora=True, quantize=None, strict=True, loss=True, norm=True, rope=True,
      mlp=True) -> model
    the two lines: HF Llama / OPT / Bloom / ... (plain or PEFT) through the kernels below.
unpatch(model) -> model                 stock behaviour again; patch_report(model) says what patch did.
nf4_quantize(weight, blocksize=64, double_quant=True, quant_storage=torch.uint8)
    -> (packed, NF4QuantState); bitsandbytes' NF4 bytes.
nf4_dequantize(packed, state, dtype=None, out=None) -> tensor of state.shape (out when given).
NF4QuantState / NF4Weight               the quant state / packed bytes + state, checked when built.
NF4Linear.from_linear(linear, ...)      frozen 4-bit linear, bitsandbytes state dict.
quantize_model(model, ...)              nn.Linear -> NF4Linear (skips lm_head).
from_bnb(model) / to_bnb(model)         bitsandbytes Linear4bit <-> NF4Linear, bytes shared.
flash_attention(q, k, v, *, causal=True, ...)  O(N)-memory attention, GQA, ALiBi, padding, packing.
fused_linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=-100, label_smoothing=0.0,
    reduction="mean", softcap=None, num_items_in_batch=None, chunk_size=None)
                                        lm_head + cross-entropy without the logits, transformers' loss.
rms_norm(x, weight, eps=1e-6, offset=0.0, cast_before_weight=True)  RMSNorm, fp32 statistics,
                                        Llama's rounding (Gemma's: offset=1.0, cast_before_weight=False).
lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0)  fused base + LoRA; weight is
                                        dense, an NF4Weight, (packed, NF4QuantState) or an NF4Linear.
apply_rotary(q, k, cos, sin, unsqueeze_dim=1) -> (q, k)   transformers' apply_rotary_pos_emb in one
                                        kernel (GQA, partial rotary, position ids / packing via cos, sin).
patch_attention(model) / unpatch_attention(model)   Llama / OPT / Bloom attention.
register_attention()                    makes attn_implementation="qlora_kernels" known to
                                        transformers (done at import when transformers is
                                        already imported).
patch_lora(model) / unpatch_lora(model)             PEFT LoRA layers -> lora_linear.
swiglu(gate, up, activation="silu") / swiglu_packed(gate_up, activation="silu")
                                        act(gate) * up (silu or gelu_tanh), fwd + bwd in one pass each.
backends()                              what was compiled and what is usable here.
"""

import sys

from . import ops  # noqa: F401  (declares the torch.library ops)
from . import backends as _kernels  # noqa: F401  (registers their per-device kernels; `backends` is the report)
from .attention import flash_attention
from .bnb_state_dict import bits_per_parameter
from .env import backends
from .lora import lora_linear
from .loss import fused_linear_cross_entropy
from .modules import NF4Linear
from .nf4 import nf4_dequantize, nf4_quantize
from .nf4_weight import NF4QuantState, NF4Weight
from .norm import rms_norm
from .rope import apply_rotary
from .patching import (
    PatchReport,
    from_bnb,
    patch,
    patch_attention,
    patch_lora,
    patch_report,
    quantize_model,
    to_bnb,
    unpatch,
    unpatch_attention,
    unpatch_lora,
)
from .patching.attention import register as register_attention
from .swiglu import swiglu, swiglu_packed

__version__ = "0.1.0"

if "transformers" in sys.modules:  # importing transformers ourselves would cost seconds
    register_attention()

__all__ = [
    "NF4Linear",
    "NF4QuantState",
    "NF4Weight",
    "PatchReport",
    "apply_rotary",
    "patch",
    "patch_report",
    "to_bnb",
    "unpatch",
    "backends",
    "bits_per_parameter",
    "flash_attention",
    "fused_linear_cross_entropy",
    "lora_linear",
    "patch_attention",
    "patch_lora",
    "register_attention",
    "unpatch_attention",
    "unpatch_lora",
    "from_bnb",
    "nf4_dequantize",
    "nf4_quantize",
    "quantize_model",
    "rms_norm",
    "swiglu",
    "swiglu_packed",
]
