# Two commands on a fresh clone: `make demo` (the main job) and `make test` (all tests).
# Both create .venv, install the pinned tools and build the native module (C++ and, when
# nvcc is found, the CUDA kernels). `make test-lower` runs all tests again in .venv-lower,
# at the lower bounds of pyproject.toml (requirements-lower.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
BUILT := $(VENV)/.native-built
# the editable install rebuilds _C only when native code or the build description changes
NATIVE_SOURCES := $(wildcard csrc/* kernels/*) CMakeLists.txt setup.py pyproject.toml
LOWER := .venv-lower
LOWER_PY := $(LOWER)/bin/python
LOWER_STAMP := $(LOWER)/.deps-installed
LOWER_LINKED := $(LOWER)/.package-linked
site_packages = $(shell $(1) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

.PHONY: build test test-lower demo bench clean

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
# too: the editable install is a path file plus the package's metadata, copied from .venv
# instead of compiling the CUDA kernels a second time.
$(LOWER_LINKED): $(BUILT) $(LOWER_STAMP)
	cp -r $(call site_packages,$(PY))/__editable__.qlora_kernels-*.pth \
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

clean:
	rm -rf build dist python/*.egg-info python/qlora_kernels/_C*.so $(BUILT)
