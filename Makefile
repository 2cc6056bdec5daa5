# Two commands on a fresh clone: `make demo` (the main job) and `make test` (all tests).
# Both create .venv, install the pinned tools and build the native module (C++ and, when
# nvcc is found, the CUDA kernels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: build test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

build: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q -p no:cacheprovider

demo: build
	$(PY) -m qlora_kernels demo

bench: build
	$(PY) -m qlora_kernels bench all

clean:
	rm -rf build dist python/*.egg-info python/qlora_kernels/_C*.so
