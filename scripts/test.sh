#!/usr/bin/env bash
# Every test: unit tests, end-to-end tests with real worker and coordinator processes on loopback,
# the reference comparison against llama.cpp, the Python gRPC client, and the seed's examples (each
# checks what it demonstrates and fails if that does not hold). One release build serves all.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -r client/tests/python/requirements.txt
cargo build --release --locked --workspace --bins --examples
release="${CARGO_TARGET_DIR:-target}/release"
"$release/strata" fetch-model >/dev/null
cargo test --release --locked --workspace
for example in test_pipeline test_batch_inference test_streaming_inference profile_pipeline benchmark_optimizations; do
  echo "=== example $example"
  "$release/examples/$example"
done
echo "examples: 5 passed, 0 failed"
