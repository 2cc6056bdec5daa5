#!/usr/bin/env bash
# One lent-GPU run (see the device tool's README): build against the torch already on the
# machine, run the GPU tests, run the benchmarks, copy logs and results JSON to $OUT.
# Needs bitsandbytes' wheel in .whl/ (the GPU image has none; its machine reaches no registry):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and is run with carry [".whl"]: bash scripts/gpu_check.sh
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
QLORA_KERNELS_CUDA_ARCHS=${QLORA_KERNELS_CUDA_ARCHS:-90a} \
    python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
python3 -m qlora_kernels env | tee "$OUT/env.json"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
python3 -m qlora_kernels bench all 2>&1 | tee "$OUT/bench.log"
cp benchmarks/results/*.json "$OUT/" 2>/dev/null || true
