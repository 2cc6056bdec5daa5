"""Per-device implementations of the ops declared in `ops/`. Importing this package
registers them; an op with no kernel for a device runs its reference meaning.

QLORA_KERNELS_TRITON_ON_CPU=1 (with TRITON_INTERPRET=1) registers the CUDA backend's Triton
kernels for CPU tensors instead of the C++ ones (`triton_on_cpu`): the GPU code paths of
whole models then run on a machine without a GPU."""

from . import cpu, cuda, loss, norm, rope, swiglu, triton_on_cpu  # noqa: F401

if triton_on_cpu.requested():
    triton_on_cpu.register()
