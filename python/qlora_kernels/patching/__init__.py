"""Model-level patching: swap layers in a user's model, keep its Parameters and behaviour."""

from .quantize import from_bnb, quantize_model

__all__ = ["from_bnb", "quantize_model"]
