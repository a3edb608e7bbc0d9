#!/usr/bin/env bash
# Which kernels a CUDA worker's decode steps spend device time in: Nsight Compute (`ncu`) records
# the duration of ~1.5 decode steps of a 1-stage bf16 worker serving 32 streams (TinyLlama shape),
# and the kernels are summed by name. Usage: bench/gpu-kernels.sh BINARY [OUT_DIR] [SKIP] [COUNT]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-kernels}; skip=${3:-20000}; count=${4:-800}
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=kernels-test-token-0123456789abc STRATA_DTYPE=bf16
mkdir -p "$out"; model="$out/tinyllama-1.1b"
[[ -f "$model/model.safetensors" ]] || "$bin" make-model --config tinyllama-1.1b --out "$model" >/dev/null
ncu --target-processes all --launch-skip "$skip" --launch-count "$count" --metrics gpu__time_duration.sum \
    --csv --print-units base --log-file "$out/ncu.csv" \
    "$bin" worker --listen 127.0.0.1:7601 --device cuda:0 --model "$model" </dev/null 2>"$out/worker.log" &
start_coordinator 7600 kernels even 127.0.0.1:7601 || exit 1
"$bin" bench --coordinator http://127.0.0.1:7600 --concurrency 32 --max-tokens 64 2>&1 | grep "c="
kill "$coordinator_pid"; kill $(jobs -p) 2>/dev/null; wait 2>/dev/null
python3 - "$out/ncu.csv" <<'PY'
import csv, collections, sys
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, body = rows[0], rows[1:]
name, metric, value = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
total = collections.Counter(); calls = collections.Counter()
for r in body:
    if r[metric] == "gpu__time_duration.sum":
        k = r[name].split("(")[0][:60]
        total[k] += float(r[value].replace(",", "")); calls[k] += 1
all_ns = sum(total.values())
print(f"{len(body)} kernels, {all_ns / 1e6:.2f} ms of device time")
for k, ns in total.most_common(25):
    print(f"{ns / 1e3:10.1f} us {100 * ns / all_ns:5.1f}%  {calls[k]:5d} calls  {k}")
PY
