"""What was compiled into this install and what can run on this machine."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

from ._native import native, native_error


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def backends() -> dict:
    """A report: versions, the native build (CUDA archs), the devices and which backend each op uses."""
    mod = native()
    build = dict(mod.build_info) if mod is not None else {"cuda": False, "cuda_archs": "", "cuda_runtime": ""}
    cuda_visible = torch.cuda.is_available()
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
        "cuda_runtime_compiled": build["cuda_runtime"],
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
    cpu = "C++" if mod is not None else "reference (PyTorch)"
    if build["cuda"]:
        gpu = {"nf4_quantize": "CUDA", "nf4_dequantize": "CUDA", "quantize_blockwise_8bit": "CUDA"}
    else:
        triton_ok = report["triton"] is not None
        gpu = {
            "nf4_quantize": "reference (PyTorch)",
            "nf4_dequantize": "Triton" if triton_ok else "reference (PyTorch)",
            "quantize_blockwise_8bit": "reference (PyTorch)",
        }
    report["ops"] = {op: {"cpu": cpu, "cuda": gpu[op] if cuda_visible else f"{gpu[op]} (no GPU here)"} for op in gpu}
    return report
