#!/usr/bin/env bash
# How fast a coordinator sends a stage its weights: one worker without a model file and a
# coordinator with the file, a fresh weight cache each round, the binaries given taking turns
# within each round. Prints each run (MiB, seconds, MiB/s, the worker's peak RSS) and the medians
# per binary, then one JSON line.
#   bench/weights-transfer.sh [--model NAME|FILE] [--rounds N] [--link RATE] [BIN...]
# --link RATE runs the two in network namespaces of their own, joined by a veth pair shaped to RATE
# (tc tbf, e.g. 1gbit) in each direction, with TLS and a token as a real cluster would (needs root).
# Without it they share loopback. BIN defaults to ./target/release/strata.
set -euo pipefail
cd "$(dirname "$0")/.."
model=qwen2.5-coder-1.5b
rounds=3
link=""
bins=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) model="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --link) link="$2"; shift 2 ;;
        -*) echo "weights-transfer.sh: unknown option $1" >&2; exit 2 ;;
        *) bins+=("$(realpath "$1")"); shift ;;
    esac
done
[[ ${#bins[@]} -gt 0 ]] || bins=("$(realpath ./target/release/strata)")
[[ -f $model ]] || model="$("${bins[0]}" fetch-model "$model" 2>/dev/null | tail -1)"
[[ -f $model ]] || { echo "weights-transfer.sh: no model ($model)" >&2; exit 1; }

work="$(mktemp -d)"
prefix="wt$(( $$ % 100000 ))"
cleanup() {
    if [[ -n $link ]]; then
        for ns in c w; do ip netns pids "$prefix-$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
    fi
    jobs -p | xargs -r kill 2>/dev/null || true
    wait 2>/dev/null || true
    if [[ -n $link ]]; then for ns in c w; do ip netns del "$prefix-$ns" 2>/dev/null || true; done; fi
    rm -rf "$work"
}
trap cleanup EXIT

worker_addr=127.0.0.1:7190
tls=()
# Command prefixes that run in the coordinator's and the worker's namespace (none on loopback).
in_c=()
in_w=()
if [[ -n $link ]]; then
    [[ $(id -u) == 0 ]] || { echo "weights-transfer.sh: --link needs root" >&2; exit 1; }
    ip netns add "$prefix-c"
    ip netns add "$prefix-w"
    ip link add "$prefix-c0" netns "$prefix-c" type veth peer name "$prefix-w0" netns "$prefix-w"
    ip -n "$prefix-c" addr add 10.78.0.1/24 dev "$prefix-c0"
    ip -n "$prefix-w" addr add 10.78.0.2/24 dev "$prefix-w0"
    for ns in c w; do
        ip -n "$prefix-$ns" link set lo up
        ip -n "$prefix-$ns" link set "$prefix-${ns}0" up
        # Each side's egress at RATE: the link's rate in both directions.
        ip netns exec "$prefix-$ns" tc qdisc add dev "$prefix-${ns}0" root tbf rate "$link" burst 256kb latency 20ms
    done
    in_c=(ip netns exec "$prefix-c")
    in_w=(ip netns exec "$prefix-w")
    worker_addr=10.78.0.2:7190
    "${bins[0]}" keys --out "$work/keys" --host 10.78.0.1 --host 10.78.0.2 >/dev/null
    tls=(--keys "$work/keys/node")
fi

one_run() {  # bin -> "mib seconds mib_per_s peak_rss_mib"
    local bin="$1" cache="$work/cache" wpid cpid line
    rm -rf "$cache"
    "${in_w[@]}" "$bin" worker --listen "$worker_addr" --weight-cache "$cache" --threads 1 "${tls[@]}" \
        </dev/null >/dev/null 2>"$work/worker.log" &
    wpid=$!
    for _ in $(seq 100); do
        "${in_c[@]}" bash -c "exec 3<>/dev/tcp/${worker_addr%:*}/${worker_addr#*:}" 2>/dev/null && break
        sleep 0.1
    done
    RUST_LOG=info "${in_c[@]}" "$bin" coordinator --listen 127.0.0.1:7191 --workers "$worker_addr" --model "$model" \
        --split even --no-warmup "${tls[@]}" </dev/null >/dev/null 2>"$work/coord.log" &
    cpid=$!
    # CPU time of both processes over the transfer (utime + stime, in clock ticks).
    cpu() { awk '{print $14 + $15}' "/proc/$wpid/stat" "/proc/$cpid/stat" | paste -sd+ | bc; }
    local cpu0=0 cpu1
    for _ in $(seq 12000); do
        grep -q "weights sent" "$work/coord.log" && break
        [[ $cpu0 != 0 ]] || ! grep -q "sending weights" "$work/coord.log" || cpu0="$(cpu)"
        kill -0 "$cpid" 2>/dev/null || { cat "$work/coord.log" >&2; return 1; }
        sleep 0.01
    done
    cpu1="$(cpu)"
    local sent_rss
    sent_rss="$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$wpid/status")"
    # The worker's peak RSS once it has loaded the stage from its cache too.
    for _ in $(seq 600); do grep -q "stages loaded" "$work/coord.log" && break; sleep 0.1; done
    local rss
    rss="$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$wpid/status")"
    kill "$cpid" "$wpid" 2>/dev/null || true
    wait "$cpid" "$wpid" 2>/dev/null || true
    line="$(grep "weights sent" "$work/coord.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g')"
    local mib seconds rate
    mib="$(sed -n 's/.*mib=\([0-9]*\).*/\1/p' <<<"$line")"
    seconds="$(sed -n 's/.*seconds="\{0,1\}\([0-9.]*\).*/\1/p' <<<"$line")"
    rate="$(sed -n 's/.*mib_per_s="\{0,1\}\([0-9.]*\).*/\1/p' <<<"$line")"
    # From the coordinator's start of loading to every stage loaded: digests, transfer and the
    # worker's load from its cache.
    local ready
    ready="$(sed 's/\x1b\[[0-9;]*m//g' "$work/coord.log" | sed -n 's/.*stages loaded ms=\([0-9]*\).*/\1/p' | tail -1)"
    echo "$mib $seconds $rate $rss $(bc <<<"scale=2; ($cpu1 - $cpu0) / $(getconf CLK_TCK)") $(bc <<<"scale=2; ${ready:-0} / 1000") $sent_rss"
}

results="$work/results"
for round in $(seq "$rounds"); do
    for i in "${!bins[@]}"; do
        read -r mib seconds rate rss cpu ready sent_rss <<<"$(one_run "${bins[$i]}")"
        echo "round $round, bin $i (${bins[$i]}): $mib MiB in $seconds s, $rate MiB/s, CPU $cpu s (both processes), stage loaded after $ready s, worker peak RSS $sent_rss MiB during the transfer and $rss MiB once loaded"
        echo "$i $mib $seconds $rate $rss $cpu $ready $sent_rss" >>"$results"
    done
done
python3 - "$results" "$link" "${bins[@]}" <<'PY'
import json, statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
link, bins = sys.argv[2] or "loopback", sys.argv[3:]
out = []
for i, b in enumerate(bins):
    r = [x for x in rows if x[0] == str(i)]
    med = {k: statistics.median(float(x[j]) for x in r) for j, k in ((2, "seconds"), (3, "mib_per_s"), (4, "worker_peak_rss_mib"), (5, "cpu_s"), (6, "loaded_s"), (7, "worker_rss_in_transfer_mib"))}
    med["mb_per_s"] = round(med["mib_per_s"] * 1.048576)
    print(f"bin {i} ({b}), {link}: median {med['mib_per_s']:.0f} MiB/s ({med['mb_per_s']} MB/s), {med['seconds']:.2f} s, CPU {med['cpu_s']:.2f} s, loaded after {med['loaded_s']:.2f} s, worker peak RSS {med['worker_rss_in_transfer_mib']:.0f} MiB in the transfer, {med['worker_peak_rss_mib']:.0f} MiB loaded")
    out.append({"bin": b, "link": link, "mib": float(r[0][1]), "runs": [float(x[3]) for x in r], "median": med})
print(json.dumps(out))
PY
