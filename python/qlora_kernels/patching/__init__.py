"""Model-level patching: swap layers in a user's model, keep its Parameters and behaviour."""

from .families import patch_attention, unpatch_attention
from .lora import patch_lora, unpatch_lora
from .model import SUPPORTED, PatchReport, patch, patch_report, unpatch
from .quantize import from_bnb, quantize_model, to_bnb

__all__ = ["SUPPORTED", "PatchReport", "from_bnb", "patch", "patch_attention", "patch_lora", "patch_report",
           "quantize_model", "to_bnb", "unpatch", "unpatch_attention", "unpatch_lora"]
