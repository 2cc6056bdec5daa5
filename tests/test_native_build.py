"""The native module: built, CUDA kernels compiled where nvcc exists, no libtorch or libstdc++ link,
CUDA kernels used only under a driver that runs their runtime."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
import warnings
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


def _needed_libraries(path):
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    libs = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert libs, dynamic
    return libs


def test_module_does_not_link_libtorch():
    libs = _needed_libraries(_native.native().__file__)
    assert not [lib for lib in libs if "torch" in lib or "c10" in lib or lib.startswith("libcudart.so")], libs


def test_module_needs_no_libstdcxx_of_the_build_machine():
    # libstdc++ is linked in: GCC 12's headers alone would ask the system for GLIBCXX_3.4.30
    path = _native.native().__file__
    assert not [lib for lib in _needed_libraries(path) if lib.startswith("libstdc++")]
    symbols = subprocess.run(["objdump", "-T", path], capture_output=True, text=True, check=True).stdout
    assert not re.findall(r"\((GLIBCXX|CXXABI)_[0-9.]+\)", symbols)


def _fake_native(runtime):
    return types.SimpleNamespace(build_info={"cuda": True, "cuda_archs": "80", "cuda_runtime": runtime})


def _usable_under(monkeypatch, runtime, driver):
    """has_cuda_kernels() for a module built with CUDA `runtime` under a driver for CUDA `driver`
    (cuDriverGetVersion's number, None: no driver), and the warnings it gave over two calls."""
    monkeypatch.setattr(_native, "native", lambda: _fake_native(runtime))
    monkeypatch.setattr(_native, "cuda_driver_version", lambda: driver)
    monkeypatch.setattr(_native, "_cuda_kernels_usable", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = _native.has_cuda_kernels()
        assert _native.has_cuda_kernels() == usable
    return usable, [str(w.message) for w in caught]


def test_cuda_kernels_step_aside_for_a_driver_older_than_their_runtime(monkeypatch):
    usable, warned = _usable_under(monkeypatch, "13.0.88", 12080)
    assert not usable
    assert len(warned) == 1, warned
    assert "CUDA 12.8" in warned[0] and "CUDA 13.0.88 runtime" in warned[0] and "driver >= 580" in warned[0]


@pytest.mark.parametrize("runtime,driver", [("13.0.88", 13000), ("13.0.88", 13020), ("12.8.93", 13000),
                                            ("13.0.88", None)])
def test_cuda_kernels_run_on_a_driver_of_their_release_or_newer(monkeypatch, runtime, driver):
    # a 13.0 driver runs a 13.x runtime (minor version compatibility); None: no driver, no GPU
    assert _usable_under(monkeypatch, runtime, driver) == (True, [])


def _fake_libcuda(directory, driver):
    """A libcuda.so.1 in `directory` whose cuDriverGetVersion says `driver`: the environment
    that makes a process load it instead of a real driver."""
    source = directory / "libcuda.c"
    source.write_text(f"int cuDriverGetVersion(int* version) {{ *version = {driver}; return 0; }}\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(directory / "libcuda.so.1"), str(source)], check=True)
    return dict(os.environ, LD_LIBRARY_PATH=str(directory), PYTHONWARNINGS="default")


def test_the_driver_version_is_read_from_libcuda(tmp_path):
    probe = "from qlora_kernels import _native; print(_native.cuda_driver_version())"
    proc = subprocess.run([sys.executable, "-c", probe], env=_fake_libcuda(tmp_path, 12080), capture_output=True,
                          text=True, check=True)
    assert proc.stdout.split()[-1] == "12080"


@pytest.mark.skipif(not _native.native() or not _native.native().build_info["cuda"],
                    reason="the CUDA kernels were not compiled (no nvcc at build)")
def test_an_old_driver_gets_the_triton_kernels_registered(tmp_path):
    # a whole import under a driver one CUDA major release older than the compiled runtime
    runtime_major = int(_native.native().build_info["cuda_runtime"].split(".")[0])
    env = _fake_libcuda(tmp_path, (runtime_major - 1) * 1000 + 80)
    probe = ("import json, qlora_kernels; r = qlora_kernels.backends(); "
             "print(json.dumps([r['cuda_kernels_usable'], r['ops']['nf4_dequantize']['cuda'], "
             "r['ops']['nf4_quantize_blocks']['cuda']]))")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    usable, dequantize, quantize = json.loads(proc.stdout.splitlines()[-1])
    assert not usable
    assert dequantize.startswith("Triton") and not quantize.startswith("CUDA"), (dequantize, quantize)
    assert proc.stderr.count("the NVIDIA driver supports CUDA") == 1, proc.stderr


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
    # the nvcc command CMake generates for kernels/*.cu (configured as the wheel build does, one arch),
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
