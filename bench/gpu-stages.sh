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
[[ -f "$model/model.safetensors" ]] || "$bin" make-model --config tinyllama-1.1b --out "$model" >/dev/null
bench_config() {  # name workers...
    local name="$1"; shift
    start_coordinator 7400 "$name" even "$@" || return
    "$bin" bench --coordinator http://127.0.0.1:7400 --concurrency 1 --max-tokens 128 \
        --json "$out/strata-$name.json" 2>&1 | grep -E "c=" | sed "s/^/$name: /"
    kill "$coordinator_pid"; wait "$coordinator_pid" 2>/dev/null
    kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; sleep 1
}
for round in $(seq "$rounds"); do
    STRATA_DTYPE=bf16 start_worker 7401 cuda:0; bench_config "one-stage-$round" 127.0.0.1:7401
    STRATA_DTYPE=bf16 start_worker 7402 cuda:0; STRATA_DTYPE=bf16 start_worker 7403 cuda:0
    bench_config "two-stage-$round" 127.0.0.1:7402 127.0.0.1:7403
done
