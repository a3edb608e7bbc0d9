#!/usr/bin/env bash
# Single-stream generation speed of `strata generate --json` with 1 and 2 local stages, interleaved,
# 5 runs each; prints each run and the medians. Usage: bench/local-generate.sh [MAX_TOKENS] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/strata
tokens=${1:-64}; runs=${2:-5}
prompt="Once upon a time, there was a little"
for _ in $(seq "$runs"); do
  for n in 1 2; do
    $bin generate --local "$n" --json --temperature 0 --ignore-eos --max-tokens "$tokens" --prompt "$prompt" 2>/dev/null \
      | python3 -c "import json,sys; d=json.loads(sys.stdin.read().splitlines()[-1]); print($n, round(d['decode_tokens_per_s'],1), round(d['tokens_per_s'],1), round(d['ttft_ms'],1))"
  done
done | python3 -c "
import sys, statistics, json
rows = [l.split() for l in sys.stdin]
out = {}
for n in ('1', '2'):
    r = [x for x in rows if x[0] == n]
    for x in r: print(f'local {n}: decode {x[1]} tok/s, end-to-end {x[2]} tok/s, TTFT {x[3]} ms')
    out[n] = {k: statistics.median(float(x[i]) for x in r) for i, k in ((1, 'decode_tok_s'), (2, 'e2e_tok_s'), (3, 'ttft_ms'))}
print(json.dumps({'medians': out}))
"
