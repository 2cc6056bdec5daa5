"""Drop-in torch.nn modules. They call ops only; they never launch a kernel themselves."""

from .nf4_linear import NF4Linear

__all__ = ["NF4Linear"]
