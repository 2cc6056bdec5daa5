"""The op registry: every qlora_kernels op is declared once here (schema, fake, autograd)
under the torch.library namespace `qlora_kernels`; backends/ only implement them."""

from . import attention, lora, nf4  # noqa: F401  (declares the ops)
from .. import backends  # noqa: F401  (registers the per-device implementations)
