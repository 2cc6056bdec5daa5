"""The native module: built, CUDA kernels compiled where nvcc exists, no libtorch link."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

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


# More values live at once than __launch_bounds__ leaves registers for (65536 / 2048 = 32 per
# thread): ptxas must spill. LIVE_VALUES = 8 fits, the control that the command itself works.
_SPILLING_KERNEL = """
__global__ void __launch_bounds__(1024, 2) pairwise(const float* __restrict__ in, float* __restrict__ out) {
  float v[LIVE_VALUES];
#pragma unroll
  for (int i = 0; i < LIVE_VALUES; ++i) v[i] = in[threadIdx.x + i * 1024];
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < LIVE_VALUES; ++i) {
#pragma unroll
    for (int j = i + 1; j < LIVE_VALUES; ++j) acc += v[i] * v[j];
  }
  out[threadIdx.x] = acc;
}
"""


@pytest.mark.skipif(not _nvcc_available(), reason="no CUDA compiler on this machine")
def test_cuda_build_fails_on_a_register_spill(tmp_path):
    # the nvcc command CMake generates for kernels/*.cu (configured as setup.py does, one arch),
    # run on a kernel that spills: the build must stop there
    root = Path(__file__).resolve().parents[1]
    build = tmp_path / "build"
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, QLORA_KERNELS_CUDA_ARCHS="80", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["cmake", "-S", str(root), "-B", str(build), "-G", "Ninja", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
                    f"-DPython_EXECUTABLE={sys.executable}"], env=env, check=True, capture_output=True)
    commands = json.loads((build / "compile_commands.json").read_text())
    kernel = next(c for c in commands if Path(c["file"]).parent == root / "kernels" and c["file"].endswith(".cu"))
    argv = shlex.split(kernel["command"])
    source, output = argv.index(kernel["file"]), argv.index(argv[argv.index("-o") + 1])

    def compile_with(live_values):
        path = tmp_path / f"pairwise_{live_values}.cu"
        path.write_text(_SPILLING_KERNEL.replace("LIVE_VALUES", str(live_values)))
        argv[source], argv[output] = str(path), str(path.with_suffix(".o"))
        return subprocess.run(argv, cwd=kernel["directory"], capture_output=True, text=True)

    fits = compile_with(8)
    assert fits.returncode == 0, fits.stderr
    spills = compile_with(80)
    assert spills.returncode != 0 and "spilled" in spills.stderr, spills.stderr
