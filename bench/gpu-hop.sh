#!/usr/bin/env bash
# What a stage boundary costs at batch 1 on one GPU, by variant, alternated for ROUNDS rounds (bf16,
# TinyLlama-1.1B shape, $BENCH_MAX_TOKENS new tokens, default 128):
#   old      every process on a multi-threaded runtime (one thread per core)
#   worker0  workers on a single-threaded runtime, coordinator as before
#   new      workers and coordinator single-threaded
#   spin5    as new, the workers' compute threads polling 5 ms after each job instead of 1 ms
#   oldspin5 as old, polling 5 ms
#   default  the defaults: workers single-threaded, coordinator one thread per core, compute
#            threads and async sides polling 5 ms on a GPU
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
# VARIANTS (default: all) picks some, e.g. "one-stage-new two-stage-old two-stage-new".
for round in $(seq "$rounds"); do
    for v in ${VARIANTS:-one-stage-old one-stage-new two-stage-old two-stage-worker0 two-stage-new}; do
        case $v in
            one-stage-old) variant "$v-$round" 1 "" "" ;;
            one-stage-new) variant "$v-$round" 1 0 0 ;;
            two-stage-old) variant "$v-$round" 2 "" "" ;;
            two-stage-worker0) variant "$v-$round" 2 0 "" ;;
            two-stage-new) variant "$v-$round" 2 0 0 ;;
            two-stage-spin5) STRATA_WORKER_ARGS="--idle-spin-us 5000" variant "$v-$round" 2 0 0 ;;
            two-stage-oldspin5) STRATA_WORKER_ARGS="--idle-spin-us 5000" variant "$v-$round" 2 "" "" ;;
            one-stage-default) variant "$v-$round" 1 "" "" ;;
            two-stage-default) variant "$v-$round" 2 "" "" ;;
            one-stage-nopoll) STRATA_WORKER_ARGS="--idle-spin-us 0" variant "$v-$round" 1 "" "" ;;
            two-stage-nopoll) STRATA_WORKER_ARGS="--idle-spin-us 0" variant "$v-$round" 2 "" "" ;;
        esac
    done
done
