#!/usr/bin/env bash
# First contact with a CUDA host: a CUDA worker and a CPU worker in one pipeline on a random-weight
# model, checked against an all-CPU run, then single-stage CUDA speed on a TinyLlama-1.1B-shaped model.
# Usage (on the GPU host, with a `--features cuda` strata binary): bench/gpu-smoke.sh BINARY [OUT_DIR]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-gpu}; mkdir -p "$out"
source "$(dirname "$0")/gpu-common.sh"
nvidia-smi -L
"$bin" make-model --config tiny --out "$out/tiny" >/dev/null
"$bin" worker --listen 127.0.0.1:7171 --device cuda:0 --model "$out/tiny" 2>"$out/w-cuda.log" &
"$bin" worker --listen 127.0.0.1:7172 --device cpu --model "$out/tiny" 2>"$out/w-cpu.log" &
sleep 3
"$bin" coordinator --listen 127.0.0.1:7170 --workers 127.0.0.1:7171,127.0.0.1:7172 --split 0-2,2-4 \
  --model "$out/tiny" 2>"$out/coord.log" &
for _ in $(seq 60); do "$bin" generate --coordinator http://127.0.0.1:7170 --prompt hi --max-tokens 1 >/dev/null 2>&1 && break; sleep 1; done
p="hello world, again"
mixed=$("$bin" generate --coordinator http://127.0.0.1:7170 --json --ignore-eos --max-tokens 32 --prompt "$p" | tail -1)
cpu=$("$bin" generate --local 1 --model "$out/tiny" --json --ignore-eos --max-tokens 32 --prompt "$p" | tail -1)
python3 - "$mixed" "$cpu" <<'PY'
import json, sys
m, c = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("mixed cuda+cpu:", m["token_ids"]); print("all cpu:       ", c["token_ids"])
print("IDENTICAL" if m["token_ids"] == c["token_ids"] else "DIFFERENT")
PY
kill %1 %2 %3 2>/dev/null; sleep 1
"$bin" make-model --config tinyllama-1.1b --out "$out/tinyllama" >/dev/null
"$bin" worker --listen 127.0.0.1:7181 --device cuda:0 --model "$out/tinyllama" 2>"$out/w-tl.log" &
sleep 2
"$bin" coordinator --listen 127.0.0.1:7180 --workers 127.0.0.1:7181 --split even --model "$out/tinyllama" 2>"$out/coord-tl.log" &
for _ in $(seq 120); do "$bin" generate --coordinator http://127.0.0.1:7180 --prompt hi --max-tokens 1 >/dev/null 2>&1 && break; sleep 1; done
for c in 1 8; do "$bin" bench --coordinator http://127.0.0.1:7180 --concurrency $c --max-tokens 128 2>&1 | tail -1; done
kill %4 %5 2>/dev/null
grep -iE "warmup|error" "$out"/*.log | head -20
