#!/usr/bin/env bash
# Cold vs warm start on a CUDA worker: TTFT of the first request on a fresh worker process, with the
# coordinator's warmup off and on. CUDA_CACHE_DISABLE=1 makes every process JIT-compile candle's PTX as
# on a fresh machine (where the driver's cache is empty). Usage: bench/gpu-warmup.sh BINARY [ROUNDS]
set -uo pipefail
bin=${1:?strata binary}; rounds=${2:-2}; out=/tmp/strata-warmup; mkdir -p "$out"
source "$(dirname "$0")/gpu-common.sh"
[ -d "$out/tiny" ] || "$bin" make-model --config tiny --out "$out/tiny" >/dev/null
for r in $(seq "$rounds"); do
  for mode in cold warm; do
    flag=""; [ $mode = cold ] && flag=--no-warmup
    CUDA_CACHE_DISABLE=1 "$bin" worker --listen 127.0.0.1:7191 --device cuda:0 --model "$out/tiny" 2>/dev/null &
    w=$!; sleep 2
    "$bin" coordinator --listen 127.0.0.1:7190 --workers 127.0.0.1:7191 --split even $flag --model "$out/tiny" 2>/dev/null &
    c=$!
    start=$(date +%s.%N)
    # The coordinator listens only once its stages are loaded (and warmed, unless --no-warmup).
    for i in $(seq 300); do python3 -c "import socket;socket.create_connection(('127.0.0.1',7190),1)" 2>/dev/null && break; sleep 0.2; done
    ready=$(python3 -c "import time;print(round(time.time()-$start,2))")
    ttft=$("$bin" generate --coordinator http://127.0.0.1:7190 --json --max-tokens 8 --prompt "hello world" | tail -1 | python3 -c "import json,sys;print(round(json.load(sys.stdin)['ttft_ms'],1))")
    echo "round $r $mode: ready after ${ready}s, first request TTFT ${ttft} ms"
    kill $c $w 2>/dev/null; wait $c $w 2>/dev/null
  done
done
