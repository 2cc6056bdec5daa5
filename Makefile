# Two commands on a fresh clone: `make demo` (the main job) and `make test` (all tests).
# Both create .venv, install the pinned tools and build the native module (C++ and, when
# nvcc is found, the CUDA kernels) as an editable install. `make test-lower` runs all tests
# again in .venv-lower, at the lower bounds of pyproject.toml (requirements-lower.txt).
# `make wheel` writes an sdist and a wheel built from it to dist/; `make test-torch211` runs
# tests with that wheel under torch 2.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
BUILT := $(VENV)/.native-built
# the editable install rebuilds _C only when native code or the build description changes, and
# then only what changed (its CMake tree stays in build/, pyproject.toml)
NATIVE_SOURCES := $(wildcard csrc/* kernels/*) CMakeLists.txt pyproject.toml
LOWER := .venv-lower
LOWER_PY := $(LOWER)/bin/python
LOWER_STAMP := $(LOWER)/.deps-installed
LOWER_LINKED := $(LOWER)/.package-linked
site_packages = $(shell $(1) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

.PHONY: build test test-lower demo bench wheel test-torch211 clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILT): $(STAMP) $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: build
	$(PY) -m pytest -q -p no:cacheprovider

$(LOWER_PY):
	$(PYTHON) -m venv $(LOWER)

$(LOWER_STAMP): requirements-lower.txt | $(LOWER_PY)
	$(LOWER_PY) -m pip install -q --upgrade pip
	$(LOWER_PY) -m pip install -q -r requirements-lower.txt
	touch $@

# _C links no libtorch (CMakeLists.txt), so the module `make build` compiled serves this venv
# too: the editable install is an import redirect (to python/ and to _C, which lives in build/,
# see pyproject.toml) with its path file, plus the package's metadata, copied from .venv
# instead of compiling the CUDA kernels a second time. Any earlier install is removed first.
$(LOWER_LINKED): $(BUILT) $(LOWER_STAMP)
	$(LOWER_PY) -m pip uninstall -q -y qlora-kernels
	cp -r $(call site_packages,$(PY))/_editable_skbc_qlora_kernels.* \
	      $(call site_packages,$(PY))/qlora_kernels-*.dist-info $(call site_packages,$(LOWER_PY))/
	touch $@

# numpy 2.3 warns at every int() of a one-element array in triton 3.6's interpreter (see
# requirements-lower.txt): thousands of lines that say nothing about this package
test-lower: $(LOWER_LINKED)
	$(LOWER_PY) -m pytest -q -p no:cacheprovider -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning"

demo: build
	$(PY) -m qlora_kernels finetune

bench: build
	$(PY) -m qlora_kernels bench all

# with the build tools of .venv (no download); QLORA_KERNELS_CUDA=0 leaves the CUDA kernels out
wheel: $(STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .

# torch's lower bound, 2.11, is on the index only as a CUDA build (about 4.8 GB with its NVIDIA
# dependencies; it runs on CPU), so CI does not run it. The wheel `make wheel` built (not the
# editable install: one built module serves several torch releases) is installed next to torch
# 2.11 and the other lower bounds. TORCH211_TESTS picks the tests.
TORCH211 := .venv-torch211
TORCH211_TESTS ?= tests/test_nf4_*.py tests/test_lora_cpu.py tests/test_attention_cpu.py tests/test_native_build.py
test-torch211: wheel
	test -x $(TORCH211)/bin/python || $(PYTHON) -m venv $(TORCH211)
	grep -v '^torch==' requirements-lower.txt > $(TORCH211)/requirements.txt
	$(TORCH211)/bin/python -m pip install -q "torch==2.11.*" -r $(TORCH211)/requirements.txt
	$(TORCH211)/bin/python -m pip install -q --no-deps --force-reinstall dist/*.whl
	$(TORCH211)/bin/python -m pytest -q -p no:cacheprovider $(TORCH211_TESTS) \
	    -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning"

clean:
	rm -rf build dist $(BUILT)
