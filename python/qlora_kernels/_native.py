"""Loads the native module qlora_kernels._C once and says what it offers.

The only file that imports `_C`; backends ask it for the module (or None, with the reason).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None
_loaded = False


def native() -> ModuleType | None:
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        try:
            _module = importlib.import_module("qlora_kernels._C")
        except ImportError as exc:  # a source checkout that was never built
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


def has_cuda_kernels() -> bool:
    mod = native()
    return bool(mod is not None and mod.build_info["cuda"])
