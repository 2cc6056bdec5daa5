"""Loads the native module qlora_kernels._C once and says what it offers.

The only file that imports `_C`; backends ask it for the module (or None, with the reason) and
whether its CUDA kernels can run on this machine (`has_cuda_kernels`).
"""

from __future__ import annotations

import ctypes
import importlib
import warnings
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None
_loaded = False
_cuda_kernels_usable: bool | None = None

# The oldest Linux driver of each CUDA major release. A CUDA runtime runs on any driver of its
# own major release or newer (minor version compatibility), and on no older one.
MIN_DRIVER_FOR_CUDA = {11: 450, 12: 525, 13: 580}
# read by _C when it loads: "auto" (the widest SIMD the CPU has) or a level it has: "baseline"
# (none), "ssse3", "avx2", "avx512", "avx512bf16"
ISA_SWITCH = "QLORA_KERNELS_CPU_ISA"


def native() -> ModuleType | None:
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        try:
            _module = importlib.import_module("qlora_kernels._C")
        except ImportError as exc:  # a source checkout that was never built
            if ISA_SWITCH in str(exc):  # built, and refused a setting the user made: not a missing build
                raise
            _error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "qlora_kernels: the native module _C is not built; using the PyTorch reference "
                f"implementations (slow). Build it with `pip install .` ({_error})",
                stacklevel=3,
            )
    return _module


def native_error() -> str | None:
    native()
    return _error


def cuda_driver_version() -> int | None:
    """The CUDA release the installed NVIDIA driver supports, as cuDriverGetVersion gives it
    (12080 is CUDA 12.8); None where no driver is installed.

    Asked of libcuda directly: torch may be a CPU build, and _C's static runtime would only say
    that the driver is too old, not which release it supports."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        get_version = libcuda.cuDriverGetVersion
    except (OSError, AttributeError):
        return None
    version = ctypes.c_int(0)
    if get_version(ctypes.byref(version)) != 0:
        return None
    return version.value


def cuda_release(version: int) -> str:
    """cuDriverGetVersion's number as a release: 12080 -> "12.8"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def has_cuda_kernels() -> bool:
    """The CUDA kernels were compiled into _C and the driver here can run their CUDA runtime.

    Decided once. With a driver older than the runtime's release every kernel launch fails
    (cudaErrorInsufficientDriver), so the answer is False, with one warning, and the CUDA backend
    registers its Triton kernels instead. Without any driver there is no GPU to run on, and the
    answer stays what was compiled."""
    global _cuda_kernels_usable
    if _cuda_kernels_usable is None:
        mod = native()
        compiled = bool(mod is not None and mod.build_info["cuda"])
        _cuda_kernels_usable = compiled and _driver_runs(mod.build_info["cuda_runtime"])
    return _cuda_kernels_usable


def _driver_runs(runtime: str) -> bool:
    driver = cuda_driver_version()
    runtime_major = int(runtime.split(".")[0])
    if driver is None or driver // 1000 >= runtime_major:
        return True
    minimum = MIN_DRIVER_FOR_CUDA.get(runtime_major)
    needs = f"driver >= {minimum}" if minimum is not None else f"driver for CUDA {runtime_major}"
    warnings.warn(
        f"qlora_kernels: the NVIDIA driver supports CUDA {cuda_release(driver)}, but the CUDA kernels were "
        f"built with the CUDA {runtime} runtime, which needs a {needs}: CUDA ops run the Triton kernels "
        "instead. Update the driver, or build qlora_kernels with a CUDA toolkit the driver supports.",
        stacklevel=4,
    )
    return False
