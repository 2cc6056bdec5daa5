#!/usr/bin/env bash
# The check to run on a CUDA machine: build the native module for this GPU's arch only, report
# what was built, run the GPU tests (kernels and whole models on CUDA), the benchmarks and the
# main job (finetune, 1b preset).
#
#   bash scripts/gpu_check.sh [OUTDIR]        (default: $OUT, else /tmp/gpu-check)
#
# Every step runs even when an earlier one failed, each under a time budget, and the whole
# check ends within 10 minutes (QLORA_KERNELS_CHECK_DEADLINE seconds, 570 by default). On one
# H200 the three GPU steps take longer than that together (GPU tests over 180 s, bench over
# 300 s, finetune 110 s): where a command may run 10 minutes at most, run the check twice,
# choosing the GPU steps with QLORA_KERNELS_CHECK_STEPS (a comma list of gpu_tests, bench,
# finetune; all by default; the preparation steps always run, and a step not chosen is left out
# of the summary):
#   QLORA_KERNELS_CHECK_STEPS=gpu_tests bash scripts/gpu_check.sh OUT1
#   QLORA_KERNELS_CHECK_STEPS=bench,finetune bash scripts/gpu_check.sh OUT2 It refuses to go on when the CUDA kernels were not built or torch sees no GPU:
# the GPU steps would then test the CPU fallbacks instead. OUTDIR gets one log per step, the
# bench and finetune JSONs and PNGs, and summary.md + summary.json (each step's status, exit
# code and duration; test counts, speed-ups, tokens/s and peak memory).
# Exit status: 0 when every step passed, 1 when one failed, 2 when it refused.
#
# Needs: an NVIDIA GPU and driver, nvcc, and the packages of requirements-dev.txt (torch with
# CUDA, triton, transformers, peft, accelerate, bitsandbytes; pybind11, cmake and ninja to
# build). Wheels in .whl/ are installed first, into a private folder, without any package
# index: that is how bitsandbytes gets onto a machine that has none and reaches no index:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# TRL's SFTTrainer test needs `datasets` too (with dill and multiprocess), which a CUDA image
# may lack: datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 the same way.
# Budgets (seconds) may be changed with QLORA_KERNELS_CHECK_BUDGET_<STEP>, e.g. ..._BENCH=200.
set -uo pipefail  # no -e: a failing step is recorded and the next one runs

cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/qlora-kernels-check.XXXXXX)  # large files (the 1b checkpoint) stay out of OUTDIR
export OUTDIR PY WORK PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
: > "$OUTDIR/steps.tsv"
rm -f "$OUTDIR/refused.txt"

START=$SECONDS
DEADLINE=${QLORA_KERNELS_CHECK_DEADLINE:-570}
budget() {  # the step's own budget, cut to what is left before the deadline
    local var="QLORA_KERNELS_CHECK_BUDGET_$1" left=$((DEADLINE - (SECONDS - START)))
    local own=${!var:-$2}
    echo $((own < left ? own : left))
}

# step NAME BUDGET LOG -- COMMAND...: runs COMMAND (a program or an exported function) under
# `timeout`, output to OUTDIR/LOG, one line in steps.tsv. A step with no time left is not run.
STEPS=${QLORA_KERNELS_CHECK_STEPS:-gpu_tests,bench,finetune}
chosen() { [[ ",$STEPS," == *",$1,"* ]]; }
for name in ${STEPS//,/ }; do
    case $name in
        gpu_tests | bench | finetune) ;;
        *) echo "QLORA_KERNELS_CHECK_STEPS: unknown step '$name' (gpu_tests, bench, finetune)" >&2; exit 2 ;;
    esac
done

step() {
    local name=$1 seconds log=$3 t0 rc
    case $name in
        gpu_tests | bench | finetune) chosen "$name" || return 0 ;;
    esac
    seconds=$(budget "${name^^}" "$2")
    shift 4
    if ((seconds < 5)); then
        printf '%s\t-1\t0\t%s\t%s\tno time left before the %s s deadline\n' "$name" "$seconds" "$log" "$DEADLINE" \
            >> "$OUTDIR/steps.tsv"
        echo "== $name: not run (deadline)"
        return
    fi
    echo "== $name (budget ${seconds} s): $*"
    t0=$SECONDS
    # SIGINT first: pytest still writes its report, finetune removes its checkpoint
    timeout --signal=INT --kill-after=15 "$seconds" bash -c '"$@"' "$name" "$@" > "$OUTDIR/$log" 2>&1
    rc=$?
    printf '%s\t%d\t%d\t%d\t%s\t\n' "$name" "$rc" $((SECONDS - t0)) "$seconds" "$log" >> "$OUTDIR/steps.tsv"
    echo "   exit $rc after $((SECONDS - t0)) s; tail of $log:"
    tail -n 3 "$OUTDIR/$log" | sed 's/^/   | /'
}

summary() {
    "$PY" scripts/gpu_summary.py write "$OUTDIR" || echo "summary writer failed (exit $?)"
    [ -f "$OUTDIR/summary.md" ] && cat "$OUTDIR/summary.md"
    rm -rf "$WORK"
}

not_run() {  # the chosen GPU steps, recorded as not run after a refusal
    for name in ${STEPS//,/ }; do
        printf '%s\t-1\t0\t0\t\t%s\n' "$name" "not run: the CUDA path is not available" >> "$OUTDIR/steps.tsv"
    done
}

# 1. the GPU and its compute capability -> the one arch to build (9.0 -> 90a: arch-specific
#    features exist from sm_90 on, and 90a code runs on every 9.0 GPU)
gpu_query() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader \
        | tee "$OUTDIR/gpu.txt"
}
export -f gpu_query
step gpu 30 gpu.log -- gpu_query
ARCHS=$(cut -d, -f4 "$OUTDIR/gpu.txt" 2>/dev/null | tr -d ' ' | sort -u \
    | awk -F. 'NF == 2 { printf "%s%s%s%s", sep, $1, $2, ($1 >= 9 ? "a" : ""); sep = ";" }')
if [ -z "$ARCHS" ]; then
    ARCHS=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m >= 9 else ""))' \
        2>/dev/null)
fi
echo "   CUDA arch to build: ${ARCHS:-unknown (the default list is built)}"

# 2. wheels from .whl/ (bitsandbytes where it is not installed)
install_wheels() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" .whl/*.whl || return
    fi
    "$PY" -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__, bitsandbytes.__file__)'
}
export -f install_wheels
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$WORK/site/bin:$PATH"
step wheels 90 wheels.log -- install_wheels

# 3. the native module, CUDA kernels for this GPU only
export QLORA_KERNELS_CUDA_ARCHS=$ARCHS
step build 240 build.log -- "$PY" -m pip install -v --no-build-isolation --no-deps -e .

# 4. what was built and what this machine offers; the gate
env_report() {  # the JSON alone in env.json, warnings in env.log
    "$PY" -m qlora_kernels env > "$OUTDIR/env.json"
}
export -f env_report
step env 60 env.log -- env_report
if ! reason=$("$PY" scripts/gpu_summary.py gate "$OUTDIR/env.json" "$ARCHS"); then
    echo "REFUSED: $reason"
    echo "$reason" > "$OUTDIR/refused.txt"
    not_run
    summary
    exit 2
fi

# 5. the GPU tests: kernels, and whole models on CUDA
step gpu_tests 300 gpu_tests.log -- "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfEs --durations=15 \
    --junitxml="$OUTDIR/gpu_tests.xml" tests

# 6. the benchmarks (JSON + PNG into OUTDIR/bench)
step bench 300 bench.log -- "$PY" -m qlora_kernels bench all --out "$OUTDIR/bench"

# 7. the main job on the 1b preset; only its JSON and PNG are kept
finetune_1b() {
    "$PY" -m qlora_kernels finetune --size 1b --device cuda --out "$WORK/runs"
    local rc=$?
    for run in "$WORK"/runs/finetune-*; do
        [ -d "$run" ] && mkdir -p "$OUTDIR/$(basename "$run")" \
            && cp "$run"/*.json "$run"/*.png "$OUTDIR/$(basename "$run")/" 2>/dev/null
    done
    return $rc
}
export -f finetune_1b
step finetune 200 finetune.log -- finetune_1b

summary
if [ "$(cut -f2 "$OUTDIR/steps.tsv" | sort -u)" = 0 ]; then exit 0; fi
exit 1
