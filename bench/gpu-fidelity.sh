#!/usr/bin/env bash
# Fidelity on the GPU: strata in f32 (1 CUDA stage, 2 CUDA stages on one GPU, and a mixed CUDA+CPU
# pipeline) against Hugging Face transformers in fp32 on the same random-weight TinyLlama-1.1B-shaped
# weights: 32 greedy tokens on 4 prompts, and the log-probabilities strata reports (top 5 per step)
# against transformers' log-softmax at the same positions. Prints a table, writes JSON.
# Usage (GPU host, a `--features cuda` binary): bench/gpu-fidelity.sh BINARY [OUT_DIR]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-fidelity}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
torchlibs=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="${torchlibs:+$torchlibs:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export STRATA_AUTH_TOKEN=fidelity-test-token-0123456789
nvidia-smi -L 2>/dev/null
preset=${STRATA_FIDELITY_PRESET:-tinyllama-1.1b}; gpu=${STRATA_FIDELITY_DEVICE:-cuda:0}
model="$out/$preset-f32"
[[ -f "$model/model.safetensors" ]] || "$bin" make-model --config "$preset" --dtype f32 --out "$model" >/dev/null

prompts=("The quick brown fox" "In a hole in the ground there lived" "1, 2, 3, 4," "Once upon a time, far away")
worker() {  # port device
    "$bin" worker --listen "127.0.0.1:$1" --device "$2" --model "$model" </dev/null >/dev/null \
        2>>"$out/workers.log" &
}
run_config() {  # name split workers...
    local name="$1" split="$2"; shift 2
    local addrs; addrs=$(IFS=,; echo "$*")
    sleep 3
    "$bin" coordinator --listen 127.0.0.1:7300 --workers "$addrs" --split "$split" --model "$model" \
        </dev/null >/dev/null 2>"$out/coord-$name.log" &
    local coord=$!
    for _ in $(seq 180); do
        "$bin" generate --coordinator http://127.0.0.1:7300 --prompt hi --max-tokens 1 >/dev/null 2>&1 && break
        sleep 1
    done
    : >"$out/$name.jsonl"
    for p in "${prompts[@]}"; do
        "$bin" generate --coordinator http://127.0.0.1:7300 --json --temperature 0 --ignore-eos \
            --max-tokens 32 --prompt "$p" | tail -1 >>"$out/$name.jsonl"
    done
    kill "$coord"; wait "$coord" 2>/dev/null
}
worker 7301 "$gpu"; run_config one-stage even 127.0.0.1:7301
worker 7302 "$gpu"; worker 7303 "$gpu"; run_config two-stage even 127.0.0.1:7302 127.0.0.1:7303
worker 7304 "$gpu"; worker 7305 cpu; run_config mixed even 127.0.0.1:7304 127.0.0.1:7305
kill $(jobs -p) 2>/dev/null
python3 "$here/gpu_fidelity.py" "$model" "$out" one-stage two-stage mixed
