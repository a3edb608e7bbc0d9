#!/usr/bin/env bash
# Cold vs warm start on a CUDA worker: TTFT of the first request on a fresh worker process, with the
# coordinator's warmup off and on. CUDA_CACHE_DISABLE=1 makes every process JIT-compile candle's PTX as
# on a fresh machine (where the driver's cache is empty).
# Usage: bench/gpu-warmup.sh BINARY [ROUNDS] [MODEL] [OUT_DIR]  (default model: a tiny random one)
set -uo pipefail
bin=${1:?strata binary}; rounds=${2:-2}; out=${4:-/tmp/strata-warmup}; mkdir -p "$out"
source "$(dirname "$0")/gpu-common.sh"
model=${3:-$out/tiny}
[ -e "$model" ] || "$bin" make-model --config tiny --out "$model" >/dev/null
: >"$out/warmup.jsonl"
for r in $(seq "$rounds"); do
  for mode in cold warm; do
    flag=""; [ $mode = cold ] && flag=--no-warmup
    CUDA_CACHE_DISABLE=1 "$bin" worker --listen 127.0.0.1:7191 --device cuda:0 --model "$model" 2>/dev/null &
    w=$!; sleep 2
    "$bin" coordinator --listen 127.0.0.1:7190 --workers 127.0.0.1:7191 --split even $flag --model "$model" \
        2>"$out/coordinator-$mode.log" &
    c=$!
    start=$(date +%s.%N)
    # The coordinator binds its port at once and serves once its stages are loaded (and warmed up,
    # unless --no-warmup): its log says when.
    done_line="stages warmed up"; [ $mode = cold ] && done_line="stages loaded"
    for _ in $(seq 1200); do grep -q "$done_line" "$out/coordinator-$mode.log" && break; sleep 0.1; done
    ready=$(python3 -c "import time;print(round(time.time()-$start,2))")
    ttft=$("$bin" generate --coordinator http://127.0.0.1:7190 --json --max-tokens 8 --prompt "hello world" | tail -1 | python3 -c "import json,sys;print(round(json.load(sys.stdin)['ttft_ms'],1))")
    echo "round $r $mode: ready after ${ready}s, first request TTFT ${ttft} ms"
    echo "{\"round\": $r, \"mode\": \"$mode\", \"ready_s\": $ready, \"first_ttft_ms\": $ttft}" >>"$out/warmup.jsonl"
    kill $c $w 2>/dev/null; wait $c $w 2>/dev/null
  done
done
