#!/usr/bin/env bash
# Profile a server under the benchmark's load with perf (Debian: apt-get install linux-perf).
#
#   tally-bench/bench/profile.sh OUT_PREFIX KEYSPACE -- COMMAND...
#
# Starts COMMAND (which must listen on $ADDR, exported for it), loads it with wrk -t2 -c400
# posting value 0 (the store's totals stay untouched) for 12 s, records 8 s of it with
# `perf record -e cpu-clock` (software clock: works in VMs without PMU access), and writes
# OUT_PREFIX.perf.data, OUT_PREFIX.txt (flat profile by symbol) and OUT_PREFIX.crates.txt
# (share by crate). Used for the postmortem in docs/benchmarks.md, e.g.:
#
#   ADDR=127.0.0.1:3999 tally-bench/bench/profile.sh /tmp/tally-hot 1000 -- \
#       target/bench/release/tally --listen 127.0.0.1:3999 --data-dir /tmp/p --ack memory
set -euo pipefail
out=$1 keyspace=$2
shift 3
export ADDR=${ADDR:-127.0.0.1:3999}
here=$(cd "$(dirname "$0")" && pwd)
RUST_LOG=warn "$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
. "$here/lib.sh"
wait_healthy "$ADDR" 100 || true
wrk -t2 -c400 -d12s -s "$here/increment.lua" "http://$ADDR/increment" -- "$keyspace" 0 0 >"$out.wrk.txt" &
load=$!
sleep 2
perf record -e cpu-clock -F 997 -g -p "$server" -o "$out.perf.data" -- sleep 8 2>/dev/null
wait $load
perf report -i "$out.perf.data" --stdio --no-children --sort symbol -g none 2>/dev/null |
    grep -E '^ +[0-9]' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' >"$out.all.txt"
head -60 "$out.all.txt" >"$out.txt"
# Share by component: kernel, libc, and the Rust crate each symbol belongs to.
awk '{ pct = $1 + 0; kind = $2; $1 = ""; $2 = ""; sym = substr($0, 3);
       if (kind == "[k]") c = "kernel (TCP, syscalls, scheduler)";
       else if (sym ~ /^(__|_int_|malloc|free|cfree|realloc|_IO)/) c = "libc (malloc, memcpy)";
       else { gsub(/^<+/, "", sym); gsub(/^(&|mut |dyn )+/, "", sym); sub(/^[A-Z][A-Za-z0-9]* as /, "", sym); split(sym, p, "::"); c = p[1] }
       share[c] += pct }
     END { for (c in share) printf "%6.2f%%  %s\n", share[c], c }' "$out.all.txt" | sort -rn >"$out.crates.txt"
grep -E 'Requests/sec' "$out.wrk.txt" || true
echo "profile: $out.txt, $out.crates.txt"
