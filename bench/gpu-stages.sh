#!/usr/bin/env bash
# 1 stage vs 2 stages on one GPU at batch 1 (bf16, TinyLlama-1.1B shape, 128 new tokens), alternated
# for ROUNDS rounds in one run: the host noise between rounds is larger than the difference.
# Usage (GPU host, a `--features cuda` binary): bench/gpu-stages.sh BINARY [OUT_DIR] [ROUNDS]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-stages}; rounds=${3:-3}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=stages-test-token-0123456789ab
model="$out/tinyllama-1.1b"
ensure_model "$model"
for round in $(seq "$rounds"); do
    STRATA_DTYPE=bf16 start_worker 7401 cuda:0; bench_config "one-stage-$round" 1 127.0.0.1:7401
    STRATA_DTYPE=bf16 start_worker 7402 cuda:0; STRATA_DTYPE=bf16 start_worker 7403 cuda:0
    bench_config "two-stage-$round" 1 127.0.0.1:7402 127.0.0.1:7403
done
