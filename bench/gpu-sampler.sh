#!/usr/bin/env bash
# The sampler options on a CUDA last stage (CPU stage 0..2, CUDA stage 2..4) against an all-CPU run,
# on the random-weight tiny model: tokens per option, and the first token's top log-probabilities
# (how far the two devices' logits differ).
# Usage (on the GPU host, with a `--features cuda` strata binary): bench/gpu-sampler.sh BINARY [OUT_DIR]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-gpu}; mkdir -p "$out"
source "$(dirname "$0")/gpu-common.sh"
[ -d "$out/tiny" ] || "$bin" make-model --config tiny --out "$out/tiny" >/dev/null
"$bin" worker --listen 127.0.0.1:7271 --device cpu --model "$out/tiny" 2>"$out/s-cpu.log" &
"$bin" worker --listen 127.0.0.1:7272 --device cuda:0 --model "$out/tiny" 2>"$out/s-cuda.log" &
sleep 3
"$bin" coordinator --listen 127.0.0.1:7270 --workers 127.0.0.1:7271,127.0.0.1:7272 --split 0-2,2-4 \
  --model "$out/tiny" 2>"$out/s-coord.log" &
for _ in $(seq 60); do "$bin" generate --coordinator http://127.0.0.1:7270 --prompt hi --max-tokens 1 >/dev/null 2>&1 && break; sleep 1; done
for opts in "" "--frequency-penalty 1.5" "--presence-penalty 2 --repetition-penalty 1.3" \
  "--logit-bias 5=-100 --logit-bias 9=4" "--temperature 0.8 --seed 4 --top-k 5" \
  "--temperature 0.8 --seed 3" "--temperature 0.8 --seed 3 --min-p 0.1"; do
  # shellcheck disable=SC2086 # the options are words
  m=$("$bin" generate --coordinator http://127.0.0.1:7270 --json --ignore-eos --max-tokens 24 --prompt "hello world, again" $opts | tail -1)
  # shellcheck disable=SC2086
  c=$("$bin" generate --local 1 --model "$out/tiny" --json --ignore-eos --max-tokens 24 --prompt "hello world, again" $opts | tail -1)
  python3 - "$opts" "$m" "$c" <<'PY'
import json, sys
o, m, c = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"[{o or 'greedy'}] {'IDENTICAL' if m['token_ids'] == c['token_ids'] else 'DIFFERENT'}")
print("  cuda last stage:", m["token_ids"]); print("  all cpu:        ", c["token_ids"])
top = lambda g: [(t["id"], round(t["logprob"], 6)) for t in g["top_logprobs"][0]]
print("  first token's top 5, cuda:", top(m)); print("  first token's top 5, cpu: ", top(c))
PY
done
kill %1 %2 %3 2>/dev/null
