"""Model-level patching: swap layers in a user's model, keep its Parameters and behaviour."""

from .attention import patch_attention, unpatch_attention
from .lora import patch_lora, unpatch_lora
from .quantize import from_bnb, quantize_model

__all__ = ["from_bnb", "patch_attention", "patch_lora", "quantize_model", "unpatch_attention", "unpatch_lora"]
