# shellcheck shell=bash
# shellcheck disable=SC2154 # bin, model and out are set by the script that sources this file
# Sourced by the bench/gpu-*.sh scripts: the CUDA runtime libraries on the loader path, and helpers
# that start workers and a coordinator for `$bin` on `$model`, logging into `$out`.

# candle's CUDA build links the CUDA 13 runtime: use the toolkit's or PyTorch's copy.
torchlibs=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="${torchlibs:+$torchlibs:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"

# ensure_model DIR: the random-weight TinyLlama-1.1B-shaped model (bf16) in DIR, written once.
ensure_model() {
    [[ -f "$1/model.safetensors" ]] || "$bin" make-model --config tinyllama-1.1b --out "$1" >/dev/null
}

# pin_prefix CPUS: sets $pin to the command prefix that runs a process on host cores CPUS (a taskset
# list), or to nothing when CPUS is empty. A prefix, not a wrapper function: a backgrounded function
# would run in a subshell, and `$!` would then name the subshell instead of the process.
pin_prefix() {
    pin=()
    if [[ -n "$1" ]]; then pin=(taskset -c "$1"); fi
}

# start_worker PORT DEVICE [CPUS]: a worker on 127.0.0.1:PORT in the background (extra flags from
# $STRATA_WORKER_ARGS), on host cores CPUS if given.
start_worker() {
    pin_prefix "${3:-}"
    # shellcheck disable=SC2086
    "${pin[@]}" "$bin" worker --listen "127.0.0.1:$1" --device "$2" --model "$model" ${STRATA_WORKER_ARGS:-} </dev/null >/dev/null \
        2>>"$out/workers.log" &
}

# start_coordinator PORT NAME SPLIT ADDR...: a coordinator on 127.0.0.1:PORT over the workers, once it
# answers a request; its pid in $coordinator_pid, its log in $out/coord-NAME.log.
start_coordinator() {
    local port="$1" name="$2" split="$3"; shift 3
    local addrs; addrs=$(IFS=,; echo "$*")
    sleep 3
    pin_prefix "${COORDINATOR_CPUS:-}"
    "${pin[@]}" "$bin" coordinator --listen "127.0.0.1:$port" --workers "$addrs" --split "$split" --model "$model" \
        </dev/null >/dev/null 2>"$out/coord-$name.log" &
    coordinator_pid=$!
    for _ in $(seq 180); do
        # A coordinator that exited (a port still taken, say) must not let an older one answer.
        if ! kill -0 "$coordinator_pid" 2>/dev/null; then
            echo "coordinator $name exited; see $out/coord-$name.log" >&2
            return 1
        fi
        "$bin" generate --coordinator "http://127.0.0.1:$port" --prompt hi --max-tokens 1 >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "coordinator $name did not start; see $out/coord-$name.log" >&2
    return 1
}

# bench_config NAME CONCURRENCY WORKER...: a coordinator over the workers (started before, with
# start_worker), `strata bench` at the given concurrency list (${BENCH_MAX_TOKENS:-128} new tokens) into
# $out/strata-NAME.json, then everything stopped.
bench_config() {
    local name="$1" concurrency="$2"; shift 2
    start_coordinator 7400 "$name" even "$@" || return
    "$bin" bench --coordinator http://127.0.0.1:7400 --concurrency "$concurrency" --max-tokens "${BENCH_MAX_TOKENS:-128}" \
        --json "$out/strata-$name.json" 2>&1 | grep -E "c=" | sed "s/^/$name: /"
    kill "$coordinator_pid"; wait "$coordinator_pid" 2>/dev/null
    jobs -p | xargs -r kill 2>/dev/null; wait 2>/dev/null; sleep 1
}
