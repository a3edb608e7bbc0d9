#!/usr/bin/env bash
# What a stage boundary costs at batch 1 on one GPU, by variant, alternated for ROUNDS rounds (bf16,
# TinyLlama-1.1B shape, $BENCH_MAX_TOKENS new tokens, default 128):
#   default  the defaults: workers single-threaded, coordinator one thread per core, compute
#            threads and async sides polling 5 ms on a GPU
#   multi    every process on a runtime of one thread per core (`--io-threads $(nproc)`)
#   both0    workers and coordinator single-threaded
#   nopoll   as default, but the workers park at once instead of polling (`--idle-spin-us 0`)
# (f32 hidden states on the wire and unary Forward calls were measured against what replaced them,
# BENCHMARKS.md "GPU: what a stage boundary costs" and "One Forward stream per stage"; their
# switches are gone.)
# Usage (GPU host, a `--features cuda` binary): bench/gpu-hop.sh BINARY [OUT_DIR] [ROUNDS]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-hop}; rounds=${3:-3}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=hop-test-token-0123456789abcdef STRATA_DTYPE=bf16
model="$out/tinyllama-1.1b"
ensure_model "$model"

# variant NAME STAGES WORKER_IO COORDINATOR_IO: one bench run (an empty IO value means the default
# runtime).
variant() {
    local name="$1" stages="$2" worker_io="$3" coordinator_io="$4" ports=()
    for port in $(seq 7401 $((7400 + stages))); do
        STRATA_IO_THREADS=$worker_io start_worker "$port" cuda:0
        ports+=("127.0.0.1:$port")
    done
    STRATA_IO_THREADS=$coordinator_io bench_config "$name" 1 "${ports[@]}"
}
# VARIANTS (default: all) picks some, e.g. "one-stage-default two-stage-multi".
cores=$(nproc)
for round in $(seq "$rounds"); do
    for v in ${VARIANTS:-one-stage-default one-stage-multi two-stage-default two-stage-multi two-stage-both0 two-stage-nopoll}; do
        case $v in
            one-stage-default) variant "$v-$round" 1 "" "" ;;
            one-stage-multi) variant "$v-$round" 1 "$cores" "$cores" ;;
            two-stage-default) variant "$v-$round" 2 "" "" ;;
            two-stage-multi) variant "$v-$round" 2 "$cores" "$cores" ;;
            two-stage-both0) variant "$v-$round" 2 0 0 ;;
            one-stage-nopoll) STRATA_WORKER_ARGS="--idle-spin-us 0" variant "$v-$round" 1 "" "" ;;
            two-stage-nopoll) STRATA_WORKER_ARGS="--idle-spin-us 0" variant "$v-$round" 2 "" "" ;;
        esac
    done
done
