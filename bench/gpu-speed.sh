#!/usr/bin/env bash
# Speed on the GPU, side by side in one run, on random-weight TinyLlama-1.1B-shaped weights (bf16 on
# disk): strata with 1 CUDA stage (bf16 and f32), 2 CUDA stages on one GPU (bf16), and 2 stages on
# two GPUs when the host has them (concurrency 1, 8, 32; prompts of 4-40 tokens, different per
# stream; 128 new tokens); 1 vs 2 stages at batch 1 in $STAGE_ROUNDS (5) alternated pairs; candle-transformers' own `llama` built into the same binary (`strata bench
# candle-llama`: batch 1, 8, 32 of one 16-token prompt, f32 and bf16); Hugging Face transformers
# (batch 1 and 32, 16-token prompts, 128 new tokens, bf16 and fp32); and the card's copy bandwidth.
# Usage (GPU host, a `--features cuda` binary): bench/gpu-speed.sh BINARY [OUT_DIR]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-speed}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=speed-test-token-0123456789abc
nvidia-smi -L 2>/dev/null
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
model="$out/tinyllama-1.1b"
ensure_model "$model"
STRATA_DTYPE=bf16 start_worker 7401 cuda:0; bench_config one-stage-bf16 1,8,32 127.0.0.1:7401
STRATA_DTYPE=f32 start_worker 7401 cuda:0; bench_config one-stage-f32 1,8,32 127.0.0.1:7401
STRATA_DTYPE=bf16 start_worker 7402 cuda:0; STRATA_DTYPE=bf16 start_worker 7403 cuda:0
bench_config two-stage-one-gpu-bf16 1,8,32 127.0.0.1:7402 127.0.0.1:7403
if (( gpus >= 2 )); then
    STRATA_DTYPE=bf16 start_worker 7404 cuda:0; STRATA_DTYPE=bf16 start_worker 7405 cuda:1
    bench_config two-stage-two-gpus-bf16 1,8,32 127.0.0.1:7404 127.0.0.1:7405
fi
# The 2-stage ratio at batch 1 is taken over alternated pairs of runs: single runs swing by a quarter
# with the host (BENCHMARKS.md), more than the difference measured.
MODEL=$model bash "$here/gpu-stages.sh" "$bin" "$out/stages" "${STAGE_ROUNDS:-5}"
for dtype in f32 bf16; do
    "$bin" bench candle-llama --model "$model" --device cuda:0 --dtype "$dtype" --batch 1,8,32 \
        --prompt-tokens 16 --decode-tokens 128 --json "$out/candle-llama-$dtype.json"
done
python3 "$here/gpu_peer.py" "$model" "$out/transformers.json"
python3 - "$out/bandwidth.json" <<'PY'
import json, sys, time, torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter(); n = 20
for _ in range(n): y.copy_(x)
torch.cuda.synchronize(); s = time.perf_counter() - t
r = {"copy_read_bytes_per_s": n * x.numel() / s, "note": "device-to-device copy of 1 GiB: bytes read per second"}
print(r); json.dump(r, open(sys.argv[1], "w"))
PY
