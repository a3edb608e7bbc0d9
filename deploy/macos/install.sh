#!/usr/bin/env bash
# Installs a strata worker on this Mac as a launchd daemon (Metal GPU), then starts it.
#   sudo ./install.sh --binary ./strata --keys ./keys [--port 7100] [--model ./model.gguf]
# The worker needs no model file (the coordinator sends its stage's weights, kept under
# PREFIX/var/strata/weights); --model installs a copy it reads instead. The binary must be built
# on a Mac with `cargo build --release --features metal`.
# Undo: sudo launchctl bootout system/com.strata.worker && sudo rm /Library/LaunchDaemons/com.strata.worker.plist
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
binary="" model="" keys="" port=7100 dry_run=0
prefix="/usr/local"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --keys) keys="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for pair in "binary:$binary" "keys:$keys" ${model:+"model:$model"}; do
    name="${pair%%:*}" value="${pair#*:}"
    if [[ -z "$value" || ! -e "$value" ]]; then
        echo "install.sh: --$name must name an existing file or directory" >&2
        exit 2
    fi
done
if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
    echo "install.sh: --port must be a port number" >&2
    exit 2
fi

plist_dir="/Library/LaunchDaemons"
[[ $dry_run == 1 ]] && plist_dir="$prefix/LaunchDaemons"
plist="$plist_dir/com.strata.worker.plist"
model_dest=""

install -d "$prefix/bin" "$prefix/var/strata/weights" "$prefix/etc/strata" "$prefix/var/log" "$plist_dir"
install -m 0755 "$binary" "$prefix/bin/strata"
if [[ -n $model ]]; then
    model_dest="$prefix/var/strata/models/$(basename "$model")"
    install -d "$prefix/var/strata/models"
    install -m 0644 "$model" "$model_dest"
fi
rm -rf "$prefix/etc/strata/keys"
cp -R "$keys" "$prefix/etc/strata/keys"
chmod 0700 "$prefix/etc/strata/keys"

# The template with this host's paths and port, and the model's arguments where it marks them.
sed -e "s#/usr/local/bin/strata#$prefix/bin/strata#" \
    -e "s#0.0.0.0:7100#0.0.0.0:$port#" \
    -e "s#/usr/local/var/strata/weights#$prefix/var/strata/weights#" \
    -e "s#/usr/local/etc/strata/keys#$prefix/etc/strata/keys#" \
    -e "s#/usr/local/var/log#$prefix/var/log#g" \
    "$here/com.strata.worker.plist" |
    awk -v model="$model_dest" '/install.sh - -model FILE/ {
            if (model != "") {
                print "        <string>--model</string>"
                print "        <string>" model "</string>"
            }
            next
        }
        { print }' > "$plist"
chmod 0644 "$plist"

if [[ $dry_run == 1 ]]; then
    echo "install.sh: dry run: wrote $plist (not loaded)"
    exit 0
fi
plutil -lint "$plist"
launchctl bootout system/com.strata.worker 2>/dev/null || true
launchctl bootstrap system "$plist"
echo "strata worker on metal:0 listening on port $port; log: $prefix/var/log/strata-worker.log"
