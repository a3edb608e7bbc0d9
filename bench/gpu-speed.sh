#!/usr/bin/env bash
# Speed on the GPU, side by side in one run: strata with 1 CUDA stage and 2 CUDA stages on one GPU
# (concurrency 1, 8, 32; prompts of 4-40 tokens, different per stream; 128 new tokens), candle-transformers'
# own `llama` built into the same binary (`strata bench candle-llama`: batch 1, 8, 32 of one 16-token
# prompt, f32 and bf16) and Hugging Face
# transformers (batch 1 and 32, 16-token prompts, 128 new tokens, bf16 and fp32) on the same
# random-weight TinyLlama-1.1B-shaped weights (bf16 on disk).
# Usage (GPU host, a `--features cuda` binary): bench/gpu-speed.sh BINARY [OUT_DIR]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-speed}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=speed-test-token-0123456789abc
nvidia-smi -L 2>/dev/null
model="$out/tinyllama-1.1b"
[[ -f "$model/model.safetensors" ]] || "$bin" make-model --config tinyllama-1.1b --out "$model" >/dev/null
bench_config() {  # name workers...
    local name="$1"; shift
    start_coordinator 7400 "$name" even "$@"
    "$bin" bench --coordinator http://127.0.0.1:7400 --concurrency 1,8,32 --max-tokens 128 \
        --json "$out/strata-$name.json" 2>&1 | grep -E "c=" | sed "s/^/$name: /"
    kill "$coordinator_pid"; wait "$coordinator_pid" 2>/dev/null
}
start_worker 7401 cuda:0; bench_config one-stage 127.0.0.1:7401
kill %1 2>/dev/null
start_worker 7402 cuda:0; start_worker 7403 cuda:0; bench_config two-stage-one-gpu 127.0.0.1:7402 127.0.0.1:7403
kill $(jobs -p) 2>/dev/null
sleep 2
for dtype in f32 bf16; do
    "$bin" bench candle-llama --model "$model" --device cuda:0 --dtype "$dtype" --batch 1,8,32 \
        --prompt-tokens 16 --decode-tokens 128 --json "$out/candle-llama-$dtype.json"
done
python3 "$here/gpu_peer.py" "$model" "$out/transformers.json"
