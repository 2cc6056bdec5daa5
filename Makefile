# Two commands on a fresh clone: `make demo` (the main job) and `make test` (all tests).
# Both create .venv, install the pinned tools and build the native module (C++ and, when
# nvcc is found, the CUDA kernels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
BUILT := $(VENV)/.native-built
# the editable install rebuilds _C only when native code or the build description changes
NATIVE_SOURCES := $(wildcard csrc/* kernels/*) CMakeLists.txt setup.py pyproject.toml

.PHONY: build test demo bench clean

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

demo: build
	$(PY) -m qlora_kernels finetune

bench: build
	$(PY) -m qlora_kernels bench all

clean:
	rm -rf build dist python/*.egg-info python/qlora_kernels/_C*.so $(BUILT)
