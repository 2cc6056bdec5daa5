"""What was compiled into this install and what can run on this machine."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

from ._native import cuda_driver_version, cuda_release, has_cuda_kernels, native, native_error


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def backends() -> dict:
    """A report: versions, the native build (CUDA archs), the devices and which backend each op uses."""
    mod = native()
    build = dict(mod.build_info) if mod is not None else {
        "cuda": False, "cuda_archs": "", "cuda_runtime": "", "cpu_isa": None}
    cuda_visible = torch.cuda.is_available()
    driver = cuda_driver_version()
    report = {
        "qlora_kernels": _version("qlora-kernels"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "native_module": mod is not None,
        "native_error": native_error(),
        "cuda_kernels_compiled": build["cuda"],
        "cuda_archs": build["cuda_archs"],
        "cpu_isa": build["cpu_isa"],
        "cuda_runtime_compiled": build["cuda_runtime"],
        "cuda_driver": None if driver is None else cuda_release(driver),
        # False where the driver is older than the compiled runtime: CUDA ops run Triton kernels
        "cuda_kernels_usable": has_cuda_kernels(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": cuda_visible,
        "device": torch.cuda.get_device_name(0) if cuda_visible else platform.processor() or platform.machine(),
    }
    if cuda_visible:
        major, minor = torch.cuda.get_device_capability(0)
        report["device_capability"] = f"sm_{major}{minor}"
    if build["cuda"]:
        count, error = mod.cuda_device_count()
        report["cuda_devices_seen_by_kernels"] = count if count >= 0 else f"none ({error})"
    cpu, cuda = op_backends("cpu"), op_backends("cuda")
    here = "" if cuda_visible else " (no GPU here)"
    report["ops"] = {name: {"cpu": cpu[name], "cuda": cuda[name] + here} for name in cpu}
    return report


def op_backends(device_type: str) -> dict[str, str]:
    """Op name -> the implementation that runs it on tensors of `device_type` (sorted by name)."""
    from .backends.common import REGISTERED

    return {name: REGISTERED.get(name, {}).get(device_type, "reference (PyTorch)")
            for name in sorted(op._name for op in _all_ops())}


def _all_ops():
    from .ops import attention, lora, loss, nf4, nf4_linear, norm, rope, swiglu

    return [
        nf4.nf4_quantize_blocks, nf4.nf4_dequantize, nf4.nf4_dequantize_out, nf4.quantize_blockwise_8bit,
        nf4_linear.nf4_linear, nf4_linear.nf4_linear_bwd, lora.lora_linear_fwd, lora.lora_linear_bwd,
        attention.flash_attention_fwd, attention.flash_attention_bwd, loss.linear_cross_entropy,
        norm.rms_norm_fwd, norm.rms_norm_bwd,
        swiglu.swiglu_fwd, swiglu.swiglu_bwd, swiglu.swiglu_packed_fwd, swiglu.swiglu_packed_bwd,
        rope.rope,
    ]
