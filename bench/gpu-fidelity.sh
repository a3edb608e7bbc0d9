#!/usr/bin/env bash
# Fidelity on the GPU: strata in f32 (1 CUDA stage, 2 CUDA stages on one GPU, and a mixed CUDA+CPU
# pipeline) against Hugging Face transformers in fp32 on the same random-weight TinyLlama-1.1B-shaped
# weights: 32 greedy tokens on 4 prompts, and the log-probabilities strata reports (top 5 per step)
# against transformers' log-softmax at the same positions. Prints a table, writes JSON.
# Usage (GPU host, a `--features cuda` binary): bench/gpu-fidelity.sh BINARY [OUT_DIR]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-fidelity}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=fidelity-test-token-0123456789
nvidia-smi -L 2>/dev/null
preset=${STRATA_FIDELITY_PRESET:-tinyllama-1.1b}; gpu=${STRATA_FIDELITY_DEVICE:-cuda:0}
model="$out/$preset-f32"
[[ -f "$model/model.safetensors" ]] || "$bin" make-model --config "$preset" --dtype f32 --out "$model" >/dev/null

prompts=("The quick brown fox" "In a hole in the ground there lived" "1, 2, 3, 4," "Once upon a time, far away")
run_config() {  # name split workers...
    local name="$1" split="$2"; shift 2
    start_coordinator 7300 "$name" "$split" "$@"
    : >"$out/$name.jsonl"
    for p in "${prompts[@]}"; do
        "$bin" generate --coordinator http://127.0.0.1:7300 --json --temperature 0 --ignore-eos \
            --max-tokens 32 --prompt "$p" | tail -1 >>"$out/$name.jsonl"
    done
    kill "$coordinator_pid"; wait "$coordinator_pid" 2>/dev/null
}
start_worker 7301 "$gpu"; run_config one-stage even 127.0.0.1:7301
start_worker 7302 "$gpu"; start_worker 7303 "$gpu"; run_config two-stage even 127.0.0.1:7302 127.0.0.1:7303
start_worker 7304 "$gpu"; start_worker 7305 cpu; run_config mixed even 127.0.0.1:7304 127.0.0.1:7305
kill $(jobs -p) 2>/dev/null
python3 "$here/gpu_fidelity.py" "$model" "$out" one-stage two-stage mixed
