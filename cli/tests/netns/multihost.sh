#!/usr/bin/env bash
# Multi-host test on one machine: the coordinator and two workers each in their own network
# namespace with its own address, joined by veth pairs on a bridge, over TLS (mutual) with a token.
# The workers have no model file: the coordinator sends each its stage's weights, and a restart of
# the coordinator sends nothing (the workers' caches hold them).
# Generation must give the single-host tokens; tokens/s is recorded at 0, 2 and 10 ms of added
# one-way latency between the coordinator and each worker (tc netem when the kernel has it, else a
# userspace delay proxy in the coordinator's namespace). Needs root.
#   cli/tests/netns/multihost.sh [path/to/strata] [--json FILE]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
strata="$(realpath "${1:-$here/../../../target/release/strata}")"
json_out="${3:-}"
python="${PYTHON:-python3}"
# Interface names are at most 15 bytes: "st" + 5 digits + "-w0-h".
prefix="st$(( $$ % 100000 ))"
net="10.77.$(( $$ % 200 + 20 ))"
work="$(mktemp -d)"
pids=()

cleanup() {
    # `ip netns exec` may fork: stop what runs inside each namespace, not just the pids we hold.
    for ns in c w0 w1; do
        ip netns pids "$prefix-$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in c w0 w1; do ip netns del "$prefix-$ns" 2>/dev/null || true; done
    ip link del "$prefix-br" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || { echo "multihost.sh: needs root (network namespaces)" >&2; exit 1; }
model="$("$strata" fetch-model 2>/dev/null | tail -1)"
[[ -f "$model" ]] || { echo "multihost.sh: no model ($model)" >&2; exit 1; }

# The network: a bridge in this namespace, one veth pair per host.
ip link add "$prefix-br" type bridge
ip link set "$prefix-br" up
declare -A addr=([c]="$net.1" [w0]="$net.2" [w1]="$net.3")
for ns in c w0 w1; do
    ip netns add "$prefix-$ns"
    ip link add "$prefix-$ns-h" type veth peer name eth0 netns "$prefix-$ns"
    ip link set "$prefix-$ns-h" master "$prefix-br" up
    ip -n "$prefix-$ns" addr add "${addr[$ns]}/24" dev eth0
    ip -n "$prefix-$ns" link set eth0 up
    ip -n "$prefix-$ns" link set lo up
done
in_ns() { local ns="$1"; shift; ip netns exec "$prefix-$ns" "$@"; }
# Runs a server inside a namespace, its real pid in $work/NAME.pid (ip netns exec may fork).
spawn_in() {  # ns name command...
    local ns="$1" name="$2"; shift 2
    # shellcheck disable=SC2016 # expanded by the inner shell: its own pid, then the command
    ip netns exec "$prefix-$ns" bash -c 'echo $$ > "$0"; exec "$@"' "$work/$name.pid" "$@" &
    pids+=($!)
}
stop() {  # name
    local pid; pid="$(cat "$work/$1.pid" 2>/dev/null)" || return 0
    kill "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}
# (no ping on minimal hosts: the workers' ports are waited for below)

"$strata" keys --out "$work/keys" --host "${addr[c]}" --host "${addr[w0]}" --host "${addr[w1]}" >/dev/null
node=(--keys "$work/keys/node")
client=(--keys "$work/keys/client")

# Workers on their hosts, listening beyond loopback (allowed: TLS and a token are on).
for w in w0 w1; do
    spawn_in "$w" "$w" "$strata" worker --listen "${addr[$w]}:7100" --weight-cache "$work/$w-cache" \
        --threads 1 "${node[@]}" </dev/null >/dev/null 2>"$work/$w.log"
done
wait_port() {  # ns host port
    for _ in $(seq 100); do
        if in_ns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    echo "multihost.sh: nothing listens on $2:$3" >&2; return 1
}
wait_port c "${addr[w0]}" 7100
wait_port c "${addr[w1]}" 7100

prompt="The three most important inventions of the last century are"
max_tokens=48
reference="$("$strata" generate --local 2 --threads 1 --split even --prompt "$prompt" \
    --max-tokens "$max_tokens" --temperature 0 --json)"
ref_tokens="$("$python" -c 'import json,sys; print(json.loads(sys.argv[1])["token_ids"])' "$reference")"

netem_ok=0
if tc qdisc add dev "$prefix-c-h" root netem delay 1ms 2>/dev/null; then
    tc qdisc del dev "$prefix-c-h" root
    netem_ok=1
fi

start_coordinator() {  # workers port
    stop coordinator
    : >"$work/coord.out"
    spawn_in c coordinator "$strata" coordinator --listen "${addr[c]}:$2" --workers "$1" --split even \
        --model "$model" "${node[@]}" --api-keys "$work/keys/api-keys" --mutual-tls --announce </dev/null >"$work/coord.out" 2>"$work/coord-$2.log"
    for _ in $(seq 300); do
        grep -q STRATA_LISTENING "$work/coord.out" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "multihost.sh: the coordinator did not start" >&2; cat "$work/coord-$2.log" >&2; return 1
}

results=()
for delay in 0 2 10; do
    workers="${addr[w0]}:7100,${addr[w1]}:7100"
    method="none"
    if [[ $delay != 0 ]]; then
        if [[ $netem_ok == 1 ]]; then
            # Delay each direction: out of the coordinator's host and out of each worker's.
            for ns in c w0 w1; do tc qdisc replace dev "$prefix-$ns-h" root netem delay "${delay}ms"; done
            method="netem"
        else
            workers=""
            for w in w0 w1; do
                port=$(( 7200 + ${w#w} + delay * 10 ))
                spawn_in c "proxy-$w-$delay" "$python" "$here/delay_proxy.py" "127.0.0.1:$port" \
                    "${addr[$w]}:7100" "$delay" </dev/null >"$work/proxy-$w-$delay.out" 2>&1
                workers+="${workers:+,}127.0.0.1:$port"
            done
            sleep 1
            method="proxy"
        fi
    fi
    start_coordinator "$workers" $(( 7000 + delay ))
    out="$(in_ns c timeout 120 "$strata" generate --coordinator "https://${addr[c]}:$(( 7000 + delay ))" "${client[@]}" \
        --prompt "$prompt" --max-tokens "$max_tokens" --temperature 0 --json)"
    line="$("$python" - "$out" "$ref_tokens" "$delay" "$method" <<'PY'
import json, sys
out, ref, delay, method = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
if out["token_ids"] != ref:
    print(f"MISMATCH at {delay} ms: {out['token_ids']} vs {ref}", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"added_latency_ms": int(delay), "method": method, "tokens": len(ref),
                  "decode_tokens_per_s": round(out["decode_tokens_per_s"], 2),
                  "ttft_ms": round(out["ttft_ms"], 1)}))
PY
)"
    echo "$line"
    results+=("$line")
    if [[ $method == netem ]]; then
        for ns in c w0 w1; do tc qdisc del dev "$prefix-$ns-h" root; done
    fi
done
# The first start sent both stages their weights; the later ones found them in the caches.
sent="$(grep -c "weights sent" "$work/coord-7000.log" || true)"
[[ $sent == 2 ]] || { echo "multihost.sh: the first start sent weights to $sent workers, not 2" >&2; exit 1; }
for port in 7002 7010; do
    hits="$(grep -c "holds every weight of the stage" "$work/coord-$port.log" || true)"
    if [[ $hits != 2 ]] || grep -q "sending weights" "$work/coord-$port.log"; then
        echo "multihost.sh: a restart sent weights again (cache hits: $hits of 2)" >&2; exit 1
    fi
done
if [[ -n "$json_out" ]]; then
    printf '%s\n' "${results[@]}" | "$python" -c 'import json,sys; json.dump([json.loads(l) for l in sys.stdin], open(sys.argv[1],"w"), indent=1)' "$json_out"
fi
echo "multihost: workers without the model file; tokens identical to the single-host run at 0, 2 and 10 ms added latency; restarts sent no weights"
