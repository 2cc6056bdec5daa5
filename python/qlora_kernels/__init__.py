"""qlora_kernels: fast, lean QLoRA fine-tuning and 4-bit inference kernels.

Public API
----------
patch(model, attention=True, lora=True, quantize=None, strict=True) -> model
    the two lines: HF Llama / OPT / Bloom (plain or PEFT) through the kernels below.
unpatch(model) -> model                 stock behaviour again; patch_report(model) says what patch did.
nf4_quantize(weight, blocksize=64, double_quant=True, quant_storage=torch.uint8)
    -> (packed, NF4QuantState); bitsandbytes' NF4 bytes.
nf4_dequantize(packed, state, dtype=None, out=None) -> tensor of state.shape (out when given).
NF4QuantState / NF4Weight               the quant state / packed bytes + state, checked when built.
NF4Linear.from_linear(linear, ...)      frozen 4-bit linear, bitsandbytes state dict.
quantize_model(model, ...)              nn.Linear -> NF4Linear (skips lm_head).
from_bnb(model) / to_bnb(model)         bitsandbytes Linear4bit <-> NF4Linear, bytes shared.
flash_attention(q, k, v, *, causal=True, ...)  O(N)-memory attention, GQA, ALiBi, padding, packing.
lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0)  fused base + LoRA; weight is
                                        dense, an NF4Weight, (packed, NF4QuantState) or an NF4Linear.
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
from .modules import NF4Linear
from .nf4 import nf4_dequantize, nf4_quantize
from .nf4_weight import NF4QuantState, NF4Weight
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
    "patch",
    "patch_report",
    "to_bnb",
    "unpatch",
    "backends",
    "bits_per_parameter",
    "flash_attention",
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
    "swiglu",
    "swiglu_packed",
]
