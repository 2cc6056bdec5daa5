"""The distributions: `python -m build` makes an sdist holding everything a wheel is built from,
then a wheel from that sdist, which installs into a fresh environment and works there.

The wheel is built without the CUDA kernels (QLORA_KERNELS_CUDA=0): nvcc would take minutes, and
the CUDA build is what `make build` and tests/test_native_build.py check."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the package, the native sources and the build description: a missing one fails the wheel build
# (or leaves a module out of the wheel) on a machine that has only the sdist
BUILD_INPUTS = ("pyproject.toml", "CMakeLists.txt", "LICENSE", "README.md")
SOURCE_DIRS = ("csrc", "kernels", "python/qlora_kernels")


def _run(argv, **kwargs):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _build(kind, source, out):
    # no isolation: the build tools of this environment, no download
    _run([sys.executable, "-m", "build", f"--{kind}", "--no-isolation", "--outdir", out, source],
         env=dict(os.environ, QLORA_KERNELS_CUDA="0"))
    (built,) = out.glob("*.tar.gz" if kind == "sdist" else "*.whl")
    return built


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    return _build("sdist", ROOT, tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory):
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    (source,) = unpacked.iterdir()
    return _build("wheel", source, tmp_path_factory.mktemp("wheel"))


def _source_files():
    files = set(BUILD_INPUTS)
    for directory in SOURCE_DIRS:
        files |= {path.relative_to(ROOT).as_posix() for path in (ROOT / directory).rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".so", ".pyc")}
    return files


def test_sdist_holds_every_native_source_and_the_package(sdist):
    with tarfile.open(sdist) as tar:
        top = {name.split("/", 1)[0] for name in tar.getnames()}
        assert len(top) == 1, top
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = _source_files()
    assert any(name.endswith(".cu") for name in expected) and any(name.endswith(".cpp") for name in expected)
    assert sorted(expected - members) == []
    # nothing built: a module compiled in the source tree must not ship in place of the wheel's own
    assert not [name for name in members if name.endswith((".so", ".pyc"))]


_CHECK = """
import json, sys
from importlib import metadata
import torch
import qlora_kernels as qk
from qlora_kernels.reference import nf4 as reference

report = qk.backends()
weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
out = qk.nf4_dequantize(*qk.nf4_quantize(weight, blocksize=64, double_quant=False), dtype=torch.float32)
expected = reference.nf4_dequantize(*reference.nf4_quantize_blocks(weight, 64), 64, weight.shape, torch.float32)
dist = metadata.distribution("qlora-kernels")
print(json.dumps({
    "package": qk.__file__,
    "native": qk._native.native().__file__ if report["native_module"] else report["native_error"],
    "quantize": report["ops"]["nf4_quantize_blocks"]["cpu"],
    "round_trip_equal": bool(torch.equal(out, expected)),
    "version": qk.__version__,
    "metadata_version": dist.version,
    "license": sorted(str(f) for f in dist.files if f.name == "LICENSE"),
}))
"""


def test_wheel_from_the_sdist_works_in_a_fresh_environment(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    # torch and numpy from this environment (installing them would download gigabytes): a path
    # file puts its site-packages directories after the fresh one. It is written after the install
    # so pip sees no qlora-kernels there, and this environment's own path files (its editable
    # install) stay unread, since Python reads path files only in site directories.
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    dependencies = [entry for entry in sys.path if Path(entry).name in ("site-packages", "dist-packages")]
    Path(site, "dependencies.pth").write_text("".join(f"{entry}\n" for entry in dependencies))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = json.loads(_run([python, "-c", _CHECK], cwd=tmp_path, env=env).splitlines()[-1])
    assert Path(result["package"]).is_relative_to(venv), result
    assert Path(result["native"]).is_relative_to(venv), result
    assert result["quantize"] == "C++"
    assert result["round_trip_equal"]
    assert result["version"] == result["metadata_version"]
    assert result["license"], result
    assert (venv / "bin" / "qlora-kernels").is_file()
