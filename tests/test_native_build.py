"""The native module: built, CUDA kernels compiled where nvcc exists, no libtorch link."""

import os
import shutil
import subprocess

import pytest

import qlora_kernels
from qlora_kernels import _native


def _nvcc_available():
    return bool(shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_module_builds_and_reports():
    mod = _native.native()
    assert mod is not None, _native.native_error()
    report = qlora_kernels.backends()
    assert report["native_module"] and report["ops"]["nf4_quantize_blocks"]["cpu"] == "C++"


@pytest.mark.skipif(not _nvcc_available(), reason="no CUDA compiler on this machine")
def test_cuda_kernels_are_compiled_when_nvcc_exists():
    info = _native.native().build_info
    assert info["cuda"], "nvcc exists but the CUDA kernels were not compiled"
    assert info["cuda_archs"]


def test_module_does_not_link_libtorch():
    path = _native.native().__file__
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    libs = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    assert libs, needed
    assert not [lib for lib in libs if "torch" in lib or "c10" in lib or lib.startswith("libcudart.so")], libs
