#!/usr/bin/env bash
# The CUDA memory pool keeping freed memory (the default, 1 GiB) vs the driver's default of keeping
# none (STRATA_CUDA_POOL_KEEP_MIB=0), alternated for ROUNDS rounds: 1 stage at concurrency 1 and 8, 2
# stages on one GPU at 1 (bf16, TinyLlama-1.1B shape, 128 new tokens).
# Usage (GPU host, a `--features cuda` binary): bench/gpu-pool.sh BINARY [OUT_DIR] [ROUNDS]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-pool}; rounds=${3:-4}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=pool-test-token-0123456789abcdef STRATA_DTYPE=bf16
model="$out/tinyllama-1.1b"
ensure_model "$model"
for round in $(seq "$rounds"); do
    for keep in 1024 0; do
        STRATA_CUDA_POOL_KEEP_MIB=$keep start_worker 7401 cuda:0
        bench_config "one-keep$keep-$round" 1,8 127.0.0.1:7401
        STRATA_CUDA_POOL_KEEP_MIB=$keep start_worker 7402 cuda:0
        STRATA_CUDA_POOL_KEEP_MIB=$keep start_worker 7403 cuda:0
        bench_config "two-keep$keep-$round" 1 127.0.0.1:7402 127.0.0.1:7403
    done
done
