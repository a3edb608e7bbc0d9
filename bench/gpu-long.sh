#!/usr/bin/env bash
# Decode attention over long histories: the wide attention kernel (32 warps per block from 256
# positions on, the default) against 8 warps at every length (the worker's hidden `--attention-wide-from 1000000`),
# 1 stage bf16 on the TinyLlama-1.1B shape, at concurrency 1 and 8 with 1024 new tokens and at
# concurrency 1 with 128 (where both run the 8-warp kernel), alternated for ROUNDS rounds; then
# candle's `llama` generating 1024 tokens at batch 1 as the fixed reference.
# Usage (GPU host, a `--features cuda` binary): bench/gpu-long.sh BINARY [OUT_DIR] [ROUNDS]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-long}; rounds=${3:-2}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=long-test-token-0123456789abcdef STRATA_DTYPE=bf16
model="$out/tinyllama-1.1b"
ensure_model "$model"
for round in $(seq "$rounds"); do
    for kernel in wide narrow; do
        from=256; [[ $kernel == narrow ]] && from=1000000
        STRATA_WORKER_ARGS="--attention-wide-from $from" start_worker 7401 cuda:0
        BENCH_MAX_TOKENS=1024 bench_config "$kernel-1024-$round" 1,8 127.0.0.1:7401
        STRATA_WORKER_ARGS="--attention-wide-from $from" start_worker 7401 cuda:0
        bench_config "$kernel-128-$round" 1 127.0.0.1:7401
    done
done
"$bin" bench candle-llama --model "$model" --device cuda:0 --dtype bf16 --batch 1 \
    --prompt-tokens 16 --decode-tokens 1024 --json "$out/candle-llama-1024.json" 2>&1 | grep -v "^$"
