#!/usr/bin/env bash
# Packs the part of llama.cpp's source tree that a CUDA build of llama-bench, llama-batched-bench and
# llama-quantize needs (ggml with its CPU and CUDA backends, src, include, common, vendor, those three
# tools, gguf-py) into one small tarball, so it fits in a copy to a GPU host, where
# bench/gpu-llamacpp.sh builds it (LLAMA_CPP_SRC=the unpacked folder).
# Usage: bench/llamacpp-slim.sh OUT.tar.gz [SOURCE_TREE]
# SOURCE_TREE defaults to the llama.cpp b11434 tree bench/llamacpp.sh unpacks.
set -euo pipefail
out=${1:?output tarball}
src=${2:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/llama.cpp-b11434/src}
[[ -f $src/CMakeLists.txt && -d $src/ggml/src/ggml-cuda ]] || { echo "$src is not a llama.cpp source tree" >&2; exit 1; }
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
tree="$stage/llama.cpp"; mkdir -p "$tree/tools" "$tree/ggml/src"
cp -r "$src"/{CMakeLists.txt,LICENSE,cmake,include,src,common,vendor,gguf-py} "$tree/"
cp -r "$src"/ggml/{CMakeLists.txt,cmake,include} "$tree/ggml/"
# ggml's sources without the backends this build leaves off (each is added only when switched on).
find "$src/ggml/src" -maxdepth 1 -type f -exec cp {} "$tree/ggml/src/" \;
cp -r "$src"/ggml/src/{ggml-cpu,ggml-cuda} "$tree/ggml/src/"
cp -r "$src"/tools/{batched-bench,llama-bench,quantize} "$tree/tools/"
cat >"$tree/tools/CMakeLists.txt" <<'CMAKE'
# Trimmed by strata's bench/llamacpp-slim.sh to the tools its GPU benchmark runs.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(batched-bench)
add_subdirectory(llama-bench)
add_subdirectory(quantize)
CMAKE
tar czf "$out" -C "$stage" llama.cpp
echo "$out: $(du -h "$out" | cut -f1)"
