#!/usr/bin/env bash
# One lent-GPU run (see the device tool's README): build against the torch already on the
# machine, run the GPU tests, the benchmarks and the main job (finetune, 1b preset; the 7b one
# too with QK_FINETUNE_7B=1, ~6 more minutes), copy logs and results (JSON, PNG) to $OUT.
# A failing step is logged and the next one still runs.
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
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" || true
python3 -m qlora_kernels bench all 2>&1 | tee "$OUT/bench.log" || true
cp benchmarks/results/*.json benchmarks/results/*.png "$OUT/" 2>/dev/null || true
sizes="1b"
if [ "${QK_FINETUNE_7B:-0}" = 1 ]; then sizes="1b 7b"; fi
for size in $sizes; do
    # the bf16 checkpoint (13.5 GB at 7b) stays out of $OUT
    python3 -m qlora_kernels finetune --size "$size" --device cuda --out /tmp/qk-runs 2>&1 \
        | tee "$OUT/finetune-$size.log" || true
done
for run in /tmp/qk-runs/finetune-*; do
    [ -d "$run" ] && mkdir -p "$OUT/$(basename "$run")" && cp "$run"/*.json "$run"/*.png "$OUT/$(basename "$run")/" || true
done
