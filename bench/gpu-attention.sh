#!/usr/bin/env bash
# strata's CUDA kernels (attention, RoPE + pool write, add + RMSNorm, SiLU · up) on and off (`--no-fused-kernels`), side by side in one
# run on the TinyLlama-1.1B shape in bf16: strata 1 stage (alternated twice) and 2 stages on one GPU
# at concurrency 1, 8, 32 (prompts of 4-40 tokens, 128 new tokens), with candle's `llama` (batch 1
# and 32 of one 16-token prompt) as the fixed reference.
# Usage (GPU host, a `--features cuda` binary): bench/gpu-attention.sh BINARY [OUT_DIR]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-attention}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=attention-test-token-0123456789
model="$out/tinyllama-1.1b"
ensure_model "$model"
for round in 1 2; do
    STRATA_DTYPE=bf16 start_worker 7401 cuda:0; bench_config "one-stage-fused-$round" 1,8,32 127.0.0.1:7401
    STRATA_WORKER_ARGS=--no-fused-kernels STRATA_DTYPE=bf16 start_worker 7401 cuda:0
    bench_config "one-stage-unfused-$round" 1,8,32 127.0.0.1:7401
done
STRATA_DTYPE=bf16 start_worker 7402 cuda:0; STRATA_DTYPE=bf16 start_worker 7403 cuda:0
bench_config two-stage-one-gpu-fused 1,8,32 127.0.0.1:7402 127.0.0.1:7403
STRATA_WORKER_ARGS=--no-fused-kernels STRATA_DTYPE=bf16 start_worker 7402 cuda:0
STRATA_WORKER_ARGS=--no-fused-kernels STRATA_DTYPE=bf16 start_worker 7403 cuda:0
bench_config two-stage-one-gpu-unfused 1,8,32 127.0.0.1:7402 127.0.0.1:7403
"$bin" bench candle-llama --model "$model" --device cuda:0 --dtype bf16 --batch 1,32 \
    --prompt-tokens 16 --decode-tokens 128 --json "$out/candle-llama-bf16.json"
