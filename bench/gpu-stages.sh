#!/usr/bin/env bash
# 1 stage vs 2 stages on one GPU at batch 1 (bf16, TinyLlama-1.1B shape, 128 new tokens), alternated
# for ROUNDS rounds in one run: the host noise between rounds is larger than the difference. With
# BASE_BINARY (another build, e.g. the commit before a change), each round also runs both
# configurations on it, so a change is measured side by side with what it changes. MODEL=DIR uses
# a model already written (gpu-speed.sh passes its own).
# Usage (GPU host, `--features cuda` binaries): bench/gpu-stages.sh BINARY [OUT_DIR] [ROUNDS] [BASE_BINARY]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-stages}; rounds=${3:-3}; base=${4:-}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=stages-test-token-0123456789ab
model=${MODEL:-$out/tinyllama-1.1b}
ensure_model "$model"
head_bin=$bin
# both_configurations SUFFIX: 1 stage, then 2 stages, on $bin.
both_configurations() {
    STRATA_DTYPE=bf16 start_worker 7401 cuda:0; bench_config "one-stage$1" 1 127.0.0.1:7401
    STRATA_DTYPE=bf16 start_worker 7402 cuda:0; STRATA_DTYPE=bf16 start_worker 7403 cuda:0
    bench_config "two-stage$1" 1 127.0.0.1:7402 127.0.0.1:7403
}
for round in $(seq "$rounds"); do
    bin=$head_bin; both_configurations "-$round"
    if [[ -n "$base" ]]; then bin=$base; both_configurations "-base-$round"; fi
done
