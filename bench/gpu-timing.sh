#!/usr/bin/env bash
# Where a CUDA worker's step time goes: each worker logs, per Forward, the time to prepare inputs,
# to queue the stage's kernels, and to finish (copy back, which waits for the device, and sample).
# Runs 1 stage at concurrency 1 and 32 (with and without fused projections, interleaved), and 2
# stages on one GPU at concurrency 1, bf16, TinyLlama
# shape; prints medians per configuration and worker. With STRATA_PHASE_TIMES=sync in the environment (the worker's --phase-times)
# the workers also synchronize after each phase of a step and report each phase's share; with
# STRATA_PHASE_TIMES=host they report the host's time to queue each phase and each layer instead.
# Usage: bench/gpu-timing.sh BINARY [OUT_DIR] [stages]   (`stages`: only 1 vs 2 stages at c=1, twice)
set -uo pipefail
bin=${1:?strata binary}; base=${2:-/tmp/strata-timing}
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=timing-test-token-0123456789abc STRATA_DTYPE=bf16 RUST_LOG=strata_worker=debug,info
model="$base/tinyllama-1.1b"; mkdir -p "$base"
ensure_model "$model"
run() {  # name concurrency workers...
    local name="$1" c="$2"; shift 2
    out="$base/$name"; mkdir -p "$out"
    for w in "$@"; do mkdir -p "$out/w$w"; out="$out/w$w" STRATA_LOG_FORMAT=json start_worker "$w" cuda:0; done
    local addrs=(); for w in "$@"; do addrs+=("127.0.0.1:$w"); done
    start_coordinator 7500 "$name" even "${addrs[@]}" || return
    "$bin" bench --coordinator http://127.0.0.1:7500 --concurrency "$c" --max-tokens 64 2>&1 | grep "c="
    kill "$coordinator_pid"; jobs -p | xargs -r kill 2>/dev/null; wait 2>/dev/null; sleep 1
    for w in "$@"; do python3 - "$out/w$w/workers.log" "$name worker $w" <<'PY'
import json, statistics, sys
rows = {}
phases = None
for line in open(sys.argv[1]):
    try:
        f = json.loads(line)
    except ValueError:
        continue
    f = {**f, **f.get("fields", {})}
    if f.get("message") == "phase times":
        phases = f
    if f.get("message") != "forward timing" or f.get("rows", 0) > f.get("sequences", 0):
        continue  # decode steps only
    rows.setdefault(f["sequences"], []).append(f)
for n, fs in sorted(rows.items()):
    if len(fs) < 10:
        continue
    med = lambda k: statistics.median(x[k] for x in fs)
    print(f"{sys.argv[2]}: {len(fs)} decode steps of {n} seqs: prepare {med('prepare_us')} us, "
          f"queue {med('queue_us')} us, finish {med('finish_us')} us")
if phases:
    how = "host time to queue" if phases.get("layer_us") else "with a device sync after each phase"
    print(f"{sys.argv[2]}: last {phases['steps']} steps, {how}: {phases['total_ms']} ms: {phases['phases']}")
    if phases.get("layer_us"):
        print(f"{sys.argv[2]}: per layer, us/step: {phases['layer_us']}")
PY
    done
}
if [[ ${3:-} == stages ]]; then
    for round in 1 2; do
        run "one-stage-c1-$round" 1 7501
        run "two-stage-c1-$round" 1 7503 7504
    done
    exit 0
fi
run one-stage-c1 1 7501
STRATA_WORKER_ARGS=--no-fused-projections run one-stage-c1-unfused 1 7505
run one-stage-c1-again 1 7506
run one-stage-c32 32 7502
STRATA_WORKER_ARGS=--no-fused-projections run one-stage-c32-unfused 32 7507
run two-stage-c1 1 7503 7504
