"""The op registry: every qlora_kernels op is declared once here (schema, fake, autograd)
under the torch.library namespace `qlora_kernels`. Declarations import no implementation:
the package's `__init__` loads `backends/`, which registers the per-device kernels."""

from . import attention, lora, loss, nf4, nf4_linear, norm, rope, swiglu  # noqa: F401  (declares the ops)
