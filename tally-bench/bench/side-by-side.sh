#!/usr/bin/env bash
# Servers side by side under the same wrk load, the way a user would check them: no
# tally-bench in the loop, just wrk with increment.lua against each server in turn,
# interleaved over ROUNDS rounds (default 3), so drift on a shared machine hits all alike.
#
#   tally-bench/bench/side-by-side.sh NAME='COMMAND' [NAME='COMMAND' ...]
#
# COMMAND is started by the shell with $ADDR (127.0.0.1:<free port>) and $DIR (a fresh
# empty directory) exported; it must serve POST /increment and GET /healthz there. E.g.
#
#   tally-bench/bench/side-by-side.sh \
#     noop-axum='target/release/tally-bench serve-noop --plain-axum --listen $ADDR' \
#     tally='target/release/tally --listen $ADDR --data-dir $DIR'
#
# Per server and round it prints requests/s, p99 latency, non-2xx answers, the server's CPU
# time per request and its threads' context switches per request (from /proc). Settings:
# ROUNDS, DURATION (s, default 10), KEYS (default 1000), CONNECTIONS (default 400).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
rounds=${ROUNDS:-3} duration=${DURATION:-10} keys=${KEYS:-1000} conns=${CONNECTIONS:-400}
scratch=$(mktemp -d)
names=() addrs=() pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

for arg in "$@"; do
    name=${arg%%=*} command=${arg#*=}
    port=$(free_port)
    while [[ " ${addrs[*]} " == *":$port "* ]]; do port=$(free_port); done
    mkdir -p "$scratch/$name"
    ADDR=127.0.0.1:$port DIR=$scratch/$name RUST_LOG=warn \
        bash -c "exec $command" >"$scratch/$name.log" 2>&1 &
    pids+=($!) names+=("$name") addrs+=("127.0.0.1:$port")
done
for i in "${!addrs[@]}"; do
    wait_healthy "${addrs[$i]}" ||
        { echo "${names[$i]} did not come up:" >&2; cat "$scratch/${names[$i]}.log" >&2; exit 1; }
    # Warm-up: 2 s posting value 0.
    wrk -t2 -c"$conns" -d2s -s "$here/increment.lua" "http://${addrs[$i]}/increment" \
        -- "$keys" 0 0 >/dev/null 2>&1
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n}'; }
ticks=$(getconf CLK_TCK)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
for round in $(seq "$rounds"); do
    for i in "${!addrs[@]}"; do
        pid=${pids[$i]}
        c0=$(cpu_ticks "$pid") s0=$(switches "$pid")
        out=$(wrk -t2 -c"$conns" -d"${duration}s" --latency -s "$here/increment.lua" \
            "http://${addrs[$i]}/increment" -- "$keys" "$duration" 2 2>&1)
        c1=$(cpu_ticks "$pid") s1=$(switches "$pid")
        requests=$(awk '/requests in/ {print $1}' <<<"$out")
        awk -v name="${names[$i]}" -v round="$round" -v reqs="$requests" \
            -v cpu=$((c1 - c0)) -v sw=$((s1 - s0)) -v ticks="$ticks" '
            /Requests\/sec/ {rps = $2}
            $1 == "99%" {p99 = $2}
            /Non-2xx/ {bad = $NF}
            END {printf "round %d  %-16s %9.0f req/s  p99 %8s  non-2xx %s  %5.1f us CPU/req  %.3f switches/req\n",
                 round, name, rps, p99, bad + 0, cpu * 1e6 / ticks / reqs, sw / reqs}' <<<"$out"
    done
done
