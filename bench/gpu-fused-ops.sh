#!/usr/bin/env bash
# The fused add + RMSNorm and SiLU · up kernels on (default) and off (the worker's hidden `--no-fused-ops`, candle's
# add, norm and activation beside strata's attention kernels), alternated for ROUNDS rounds: 1 stage
# at concurrency 1, 8, 32 and 2 stages on one GPU at concurrency 1 (bf16, TinyLlama-1.1B shape, 128
# new tokens).
# Usage (GPU host, a `--features cuda` binary): bench/gpu-fused-ops.sh BINARY [OUT_DIR] [ROUNDS]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-fused-ops}; rounds=${3:-3}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=fused-ops-token-0123456789abcdef STRATA_DTYPE=bf16
model="$out/tinyllama-1.1b"
ensure_model "$model"
for round in $(seq "$rounds"); do
    for ops in on off; do
        flag=""; [[ $ops == off ]] && flag=--no-fused-ops
        STRATA_WORKER_ARGS=$flag start_worker 7401 cuda:0
        bench_config "one-stage-$ops-$round" 1,8,32 127.0.0.1:7401
        STRATA_WORKER_ARGS=$flag start_worker 7401 cuda:0; STRATA_WORKER_ARGS=$flag start_worker 7402 cuda:0
        bench_config "two-stage-$ops-$round" 1 127.0.0.1:7401 127.0.0.1:7402
    done
done
