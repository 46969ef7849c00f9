#!/usr/bin/env bash
# Where a server's CPU and context switches go, thread by thread, under the benchmark's load:
# the breakdown behind "the writer costs ~116 µs per group" in docs/benchmarks.md.
#
#   tally-bench/bench/threads.sh COMMAND
#
# COMMAND is started by the shell with $ADDR (127.0.0.1:<free port>) and $DIR (a fresh empty
# directory) exported, as in side-by-side.sh, e.g.
#
#   tally-bench/bench/threads.sh 'target/release/tally --listen $ADDR --data-dir $DIR'
#
# After a 3 s warm-up it loads the server with wrk (increment.lua, value 0) for DURATION
# seconds (default 10) and prints, per thread name, the CPU time and the voluntary and
# involuntary context switches per request (from /proc/<pid>/task/*), and for tally the
# journal's groups per request and records per group, and the flusher's batches per request
# (from /metrics). Settings: DURATION, KEYS (default 1000), CONNECTIONS (default 400).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
duration=${DURATION:-10} keys=${KEYS:-1000} conns=${CONNECTIONS:-400}
scratch=$(mktemp -d)
. "$here/lib.sh"
export ADDR=127.0.0.1:$(free_port) DIR=$scratch/data
mkdir -p "$DIR"
RUST_LOG=warn bash -c "exec $1" >"$scratch/server.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$scratch"' EXIT
wait_healthy "$ADDR" || { echo "the server did not come up:" >&2; cat "$scratch/server.log" >&2; exit 1; }
load() {
    wrk -t2 -c"$conns" -d"$1s" --latency -s "$here/increment.lua" "http://$ADDR/increment" \
        -- "$keys" 0 0
}
# thread-id name cpu-ticks voluntary involuntary, one line per thread
snapshot() {
    for t in /proc/"$pid"/task/*; do
        echo "${t##*/} $(tr ' ' '_' <"$t/comm") $(awk '{print $14 + $15}' "$t/stat")" \
            "$(awk '/^voluntary_ctxt/ {v = $2} /^nonvoluntary_ctxt/ {n = $2} END {print v, n}' "$t/status")"
    done | sort
}
groups() { curl -fs "http://$ADDR/metrics" | awk '/^tally_journal_group_size_(sum|count) / {printf "%s ", $2}'; }
batches() { curl -fs "http://$ADDR/metrics" | awk '/^tally_flush_batches_total\{result="committed"\} / {print $2}'; }
load 3 >/dev/null
before=$(snapshot) groups_before=$(groups || true) batches_before=$(batches || true)
load "$duration" >"$scratch/wrk.txt"
after=$(snapshot) groups_after=$(groups || true) batches_after=$(batches || true)
requests=$(awk '/requests in/ {print $1}' "$scratch/wrk.txt")
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
grep -E 'Requests/sec|99%' "$scratch/wrk.txt" | xargs echo
join <(echo "$before") <(echo "$after") | awk -v r="$requests" -v hz="$(getconf CLK_TCK)" '
    { cpu[$2] += ($7 - $3) * 1e6 / hz; vol[$2] += $8 - $4; inv[$2] += $9 - $5
      all += $8 - $4 + $9 - $5 }
    END { for (n in cpu) printf "%-18s %6.2f us CPU/req  %.4f voluntary  %.4f involuntary switches/req\n",
                                n, cpu[n] / r, vol[n] / r, inv[n] / r
          printf "~all threads       %.4f switches/req\n", all / r }' | sort
awk -v r="$requests" -v a="${groups_before:-0 0}" -v b="${groups_after:-0 0}" 'BEGIN {
    split(a, x, " "); split(b, y, " "); s = y[1] - x[1]; c = y[2] - x[2]
    if (c > 0) printf "journal: %.4f groups/req, %.1f records/group\n", c / r, s / c }'
awk -v r="$requests" -v a="${batches_before:-0}" -v b="${batches_after:-0}" 'BEGIN {
    if (b > a) printf "flush: %.4f batches/req, %.1f requests/batch\n", (b - a) / r, r / (b - a) }'
