"""Model-level patching: swap layers in a user's model, keep its Parameters and behaviour.

`patch` puts the pieces together (model.py); `FAMILIES` (families.py) is the registry of the
model types it knows and of the parts (`PARTS`: loss, norm, rope, mlp; each a module of its own
here with `patch_<part>` / `unpatch_<part>`) that apply to each."""

from .families import FAMILIES, PARTS, patch_attention, unpatch_attention
from .lora import patch_lora, unpatch_lora
from .model import SUPPORTED, PatchReport, patch, patch_report, unpatch
from .quantize import from_bnb, quantize_model, to_bnb

__all__ = ["FAMILIES", "PARTS", "SUPPORTED", "PatchReport", "from_bnb", "patch", "patch_attention", "patch_lora",
           "patch_report", "quantize_model", "to_bnb", "unpatch", "unpatch_attention", "unpatch_lora"]
