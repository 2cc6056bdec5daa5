"""qlora_kernels: fast, lean QLoRA fine-tuning and 4-bit inference kernels.

Public API
----------
nf4_quantize(weight, blocksize=64, double_quant=True, quant_storage=torch.uint8)
    -> (packed, NF4QuantState); bitsandbytes' NF4 bytes.
nf4_dequantize(packed, state, dtype=None) -> tensor of state.shape.
NF4Linear.from_linear(linear, ...)      frozen 4-bit linear, bitsandbytes state dict.
quantize_model(model, ...)              nn.Linear -> NF4Linear (skips lm_head).
from_bnb(model)                         bitsandbytes Linear4bit -> NF4Linear, bytes shared.
backends()                              what was compiled and what is usable here.
"""

from . import ops  # noqa: F401  (registers the torch.library ops)
from .env import backends
from .modules import NF4Linear
from .nf4 import NF4QuantState, bits_per_parameter, nf4_dequantize, nf4_quantize
from .patching import from_bnb, quantize_model

__version__ = "0.1.0"

__all__ = [
    "NF4Linear",
    "NF4QuantState",
    "backends",
    "bits_per_parameter",
    "from_bnb",
    "nf4_dequantize",
    "nf4_quantize",
    "quantize_model",
]
