#!/usr/bin/env bash
# Everything issue #5 measures on a GPU host, in one run (see BENCHMARKS.md for results):
#   1. first-request TTFT of a fresh worker with and without warmup (JIT cache disabled, as on a
#      fresh machine), TinyLlama-1.1B shape;
#   2. the CUDA-only tests (if their binary is given);
#   3. fidelity against transformers (gpu-fidelity.sh: tokens and whole logits, f32 and bf16);
#   4. speed against candle's `llama` and transformers (gpu-speed.sh);
# then one table (gpu_report.py) and $OUT/gpu.json.
# Usage: bench/gpu.sh STRATA_BINARY [OUT_DIR] [CUDA_TEST_BINARY]
set -uo pipefail
bin=${1:?strata binary (built with --features cuda)}; out=${2:-/tmp/strata-gpu}; tests=${3:-}
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"
source "$here/gpu-common.sh"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"
model="$out/speed/tinyllama-1.1b"; mkdir -p "$out/speed"
ensure_model "$model"
echo "== 1. fresh-worker TTFT (cold = no warmup, warm = coordinator warms up first)"
bash "$here/gpu-warmup.sh" "$bin" 1 "$model" "$out/warmup"
if [[ -n $tests ]]; then
    echo "== 2. CUDA-only tests"
    "$tests" --include-ignored --test-threads 1 2>&1 | grep -E "^test |rel L2|result" || status=1
fi
echo "== 3. fidelity"
bash "$here/gpu-fidelity.sh" "$bin" "$out/fidelity" || status=1
echo "== 4. speed"
bash "$here/gpu-speed.sh" "$bin" "$out/speed"
python3 "$here/gpu_report.py" "$out" || status=1
exit $status
