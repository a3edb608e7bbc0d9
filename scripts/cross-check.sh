#!/usr/bin/env bash
# Type-checks the worker and the CLI for Apple silicon (with Metal) and for ARM Linux, with
# -D warnings, using only what the package registries offer: Debian's rustc-web/cargo-web and their
# std sources (rust-web-src, for -Zbuild-std), gcc-aarch64-linux-gnu for ARM Linux's C, and PyPI's
# ziglang as the C compiler for macOS. Target directories live outside the clone
# ($STRATA_HOME/cross/target), so a second run takes seconds; a cold one about 12 minutes for ARM
# Linux and 3 more for macOS on 2 cores. scripts/test.sh runs both.
# Usage: scripts/cross-check.sh [linux|macos]...   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${STRATA_HOME:-$HOME/.cache/strata}/cross
mkdir -p "$cache"

need=()
[[ -x /usr/bin/rustc && $(/usr/bin/rustc --version) == "rustc 1.96"* ]] || need+=(rustc-web cargo-web)
[[ -f /usr/lib/rustlib/src/rust/library/Cargo.lock ]] || need+=(rust-web-src)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if ((${#need[@]})); then
  if [[ $(id -u) == 0 ]]; then
    apt-get install -y -q "${need[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
  else
    echo "cross-check.sh: install ${need[*]} (Debian package names)" >&2
    exit 1
  fi
fi
python3 -c "import ziglang" 2>/dev/null || python3 -m pip install -q --disable-pip-version-check ziglang

# zig cc for aarch64-macos, without the flags cc-rs adds for Apple's clang.
cat >"$cache/zigcc" <<'EOF'
#!/usr/bin/env bash
args=()
skip=0
for a in "$@"; do
  if ((skip)); then skip=0; continue; fi
  case "$a" in
    -arch) skip=1 ;;
    -mmacosx-version-min=*|--target=*) ;;
    *) args+=("$a") ;;
  esac
done
exec python3 -m ziglang cc -target aarch64-macos "${args[@]}"
EOF
chmod +x "$cache/zigcc"

check() {
  local target=$1
  shift
  echo "=== cargo check --target $target $*"
  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS="-D warnings" CARGO_TARGET_DIR="$cache/target" \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CC_aarch64_apple_darwin="$cache/zigcc" \
    /usr/bin/cargo check -Zbuild-std --locked --target "$target" -p strata-worker -p strata-cli "$@"
}

targets=("$@")
((${#targets[@]})) || targets=(linux macos)
for t in "${targets[@]}"; do
  case "$t" in
    linux) check aarch64-unknown-linux-gnu ;;
    macos) check aarch64-apple-darwin --features strata-cli/metal ;;
    *) echo "cross-check.sh: unknown target $t (linux or macos)" >&2; exit 2 ;;
  esac
done
echo "cross checks: clean"
