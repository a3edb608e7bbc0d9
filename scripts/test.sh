#!/usr/bin/env bash
# Every test: unit tests, end-to-end tests with real worker and coordinator processes on loopback,
# the reference comparison against llama.cpp, and the Python gRPC client. One release build serves all.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -r client/tests/python/requirements.txt
cargo build --release --locked --workspace
./target/release/strata fetch-model >/dev/null
cargo test --release --locked --workspace
