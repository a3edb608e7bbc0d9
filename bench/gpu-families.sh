#!/usr/bin/env bash
# Fidelity of every model family on the GPU: for each preset (a real model's config.json shipped in
# model/configs/, random weights of its exact shape written by `strata make-model`), runs
# gpu-fidelity.sh: strata f32 through 1 CUDA stage, 2 CUDA stages and CUDA + CPU against
# transformers fp32 (32 greedy tokens on 4 prompts, whole last-position logits), and bf16 against
# transformers' own bf16 error. Deletes each model after its run (they are 5-15 GB in f32).
# Usage (GPU host, a `--features cuda` binary): bench/gpu-families.sh BINARY [OUT_DIR] [PRESET...]
set -uo pipefail
bin=${1:?strata binary}; out=${2:-/tmp/strata-families}; shift $(( $# >= 2 ? 2 : $# ))
here="$(cd "$(dirname "$0")" && pwd)"
presets=("$@")
((${#presets[@]})) || presets=(llama-3.2-1b qwen2.5-1.5b qwen3-1.7b gemma-2-2b gemma-3-1b phi-3-mini)
status=0
for preset in "${presets[@]}"; do
    echo "=== $preset"
    start=$SECONDS
    STRATA_FIDELITY_PRESET=$preset "$here/gpu-fidelity.sh" "$bin" "$out/$preset" || status=1
    rm -rf "$out/$preset/$preset-f32"
    echo "=== $preset: $((SECONDS - start)) s"
done
exit $status
