#!/usr/bin/env bash
# strata's CUDA stage against llama.cpp's CUDA build on the same GGUF files, side by side in one run
# on the GPU host (issue #24): random-weight GGUFs of real shapes (bench/gguf_random.py, then
# llama-quantize to Q4_K_M and Q4_1), then for each file
#   - llama.cpp: `llama-bench` pp512 and tg128 (batch 1) and `llama-batched-bench` decode at 1, 8 and
#     32 parallel sequences of 32-token prompts, 128 new tokens (S_TG, aggregate);
#   - strata: one CUDA worker and a coordinator, `strata bench --concurrency 1,8,32 --max-tokens 128`
#     (prompts of 4-40 tokens), in each configuration of $VARIANTS (default: as built, and with CUDA
#     graphs off), alternated for $ROUNDS rounds, and the greedy tokens of all compared.
# The summary table (bench/gpu_llamacpp_report.py) prints medians and writes $OUT_DIR/llamacpp.json.
#
# llama.cpp: LLAMA_CPP=DIR names a CUDA build's bin folder (llama-bench, llama-batched-bench,
# llama-quantize and their libraries); otherwise LLAMA_CPP_SRC=DIR (a llama.cpp b11434 source tree,
# e.g. the slim copy bench/llamacpp-slim.sh packs) is built here with CMake. GGUF_PY=DIR is its gguf-py
# (default: $LLAMA_CPP_SRC/gguf-py). SHAPES (default tinyllama-1.1b) and TYPES (Q4_K_M Q4_1) choose
# the files; LAYERS=N and DEVICE=cpu make a quick trial of the script on a machine without a GPU.
# Usage (GPU host, a `--features cuda` binary): bench/gpu-llamacpp.sh BINARY [OUT_DIR]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-llamacpp}; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/gpu-common.sh"
export STRATA_AUTH_TOKEN=llamacpp-test-token-0123456789
rounds=${ROUNDS:-2}
# Worker configurations, NAME=FLAGS separated by `|`: the first is the default build.
IFS='|' read -r -a variants <<<"${VARIANTS:-graphs=|no-graphs=--no-cuda-graphs}"
printf '%s\n' "${variants[@]%%=*}" >"$out/variants.txt"

if [[ -z ${LLAMA_CPP:-} ]]; then
    src=${LLAMA_CPP_SRC:?set LLAMA_CPP (a built bin folder) or LLAMA_CPP_SRC (a source tree)}
    build=/tmp/llama-cuda-build
    echo "== building llama.cpp from $src into $build"
    if ! cmake -S "$src" -B "$build" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_APP=OFF -DCMAKE_BUILD_TYPE=Release \
        >"$out/llama-build.log" 2>&1 ||
        ! cmake --build "$build" -j "$(nproc)" --target llama-bench llama-batched-bench llama-quantize \
            >>"$out/llama-build.log" 2>&1; then
        echo "llama.cpp build failed: $out/llama-build.log" >&2; exit 1
    fi
    LLAMA_CPP=$build/bin
fi
gguf_py=${GGUF_PY:-${LLAMA_CPP_SRC:-}/gguf-py}
export LD_LIBRARY_PATH="$LLAMA_CPP:$LD_LIBRARY_PATH"

# strata_round NAME: one worker on $model (extra flags in $STRATA_WORKER_ARGS), the throughput bench
# into $out/strata-NAME.json, and 64 greedy tokens of two prompts into $out/tokens-NAME.json.
strata_round() {
    start_worker 7401 "${DEVICE:-cuda:0}"
    start_coordinator 7400 "$1" even 127.0.0.1:7401 || return
    "$bin" bench --coordinator http://127.0.0.1:7400 --concurrency 1,8,32 --max-tokens 128 \
        --json "$out/strata-$1.json" 2>&1 | grep -E "c=" | sed "s/^/$1: /"
    for prompt in "The capital of France is" "def fibonacci(n):"; do
        "$bin" generate --coordinator http://127.0.0.1:7400 --prompt "$prompt" --max-tokens 64 \
            --temperature 0 --ignore-eos --json
    done >"$out/tokens-$1.json" 2>>"$out/generate.log"
    # Prefill: prompts of 513 tokens (the synthetic vocabulary has a token per byte, and a BOS),
    # 1 new token, three of them that share no prefix (the prefix cache would skip it); their time to
    # first token against llama-bench's pp512.
    local long; long=$(printf 'x%.0s' $(seq 511))
    for first in a b c; do
        "$bin" generate --coordinator http://127.0.0.1:7400 --prompt "$first$long" --max-tokens 1 --json
    done >"$out/prefill-$1.json" 2>>"$out/generate.log"
    kill "$coordinator_pid"; wait "$coordinator_pid" 2>/dev/null
    jobs -p | xargs -r kill 2>/dev/null; wait 2>/dev/null; sleep 1
}

for shape in ${SHAPES:-tinyllama-1.1b}; do
    shape_name="$shape${LAYERS:+-$LAYERS-layers}"; f16="/tmp/$shape_name-f16.gguf"
    echo "== $shape: random f16 GGUF"
    [[ -f $f16 ]] || python3 "$here/gguf_random.py" "$shape" "$f16" --gguf-py "$gguf_py" ${LAYERS:+--layers "$LAYERS"} >/dev/null || exit 1
    for type in ${TYPES:-Q4_K_M Q4_1}; do
        name="$shape_name-$type"; model="/tmp/$name.gguf"
        [[ -f $model ]] || "$LLAMA_CPP/llama-quantize" "$f16" "$model" "$type" "$(nproc)" >"$out/quantize-$name.log" 2>&1 ||
            { echo "llama-quantize $type failed: $out/quantize-$name.log" >&2; exit 1; }
        echo "== $name: llama.cpp"
        "$LLAMA_CPP/llama-bench" -m "$model" -ngl 99 -p 512 -n 128 -r 3 -o json >"$out/llama-bench-$name.json" \
            2>"$out/llama-bench-$name.log" || echo "llama-bench failed: $out/llama-bench-$name.log" >&2
        "$LLAMA_CPP/llama-batched-bench" -m "$model" -ngl 99 -c 8192 -b 2048 -ub 512 -npp 32 -ntg 128 \
            -npl 1,8,32 --output-format jsonl >"$out/llama-batched-$name.jsonl" 2>"$out/llama-batched-$name.log" ||
            echo "llama-batched-bench failed: $out/llama-batched-$name.log" >&2
        for round in $(seq "$rounds"); do
            for variant in "${variants[@]}"; do
                STRATA_WORKER_ARGS="${variant#*=}" strata_round "$name-${variant%%=*}-$round"
            done
        done
    done
done
python3 "$here/gpu_llamacpp_report.py" "$out"
