#!/usr/bin/env bash
# One tally (defaults, SQLite, ack=journal) under wrk -t2 -c400, 1,000 keys, 3 s warm-up + 10 s;
# MODE=other puts the journal writer thread back under SCHED_OTHER (chrt) before the load.
# Prints p99, max latency, and how many journal fsyncs took over 10 ms and over 50 ms.
set -euo pipefail
cd /work/main; . tally-bench/bench/lib.sh
D=$(mktemp -d); P=$(free_port)
RUST_LOG=warn target/release/tally --listen 127.0.0.1:$P --data-dir $D >/dev/null 2>&1 & SP=$!
wait_healthy 127.0.0.1:$P
if [ "${MODE:-batch}" = other ]; then
  for t in /proc/$SP/task/*; do [ "$(cat $t/comm)" = journal-writer ] && chrt -o -p 0 ${t##*/}; done
fi
for t in /proc/$SP/task/*; do [ "$(cat $t/comm)" = journal-writer ] && pol=$(chrt -p ${t##*/} | head -1 | awk '{print $NF}'); done
wrk -t2 -c400 -d3s -s tally-bench/bench/increment.lua http://127.0.0.1:$P/increment -- 1000 0 0 >/dev/null
m0=$(curl -s 127.0.0.1:$P/metrics)
out=$(wrk -t2 -c400 -d10s --latency -s tally-bench/bench/increment.lua http://127.0.0.1:$P/increment -- 1000 0 0)
m1=$(curl -s 127.0.0.1:$P/metrics)
b() { echo "$1" | awk -v le="$2" '$1 ~ "^tally_journal_fsync_seconds_bucket\\{le=\""le"\"\\}" {print $2} $1=="tally_journal_fsync_seconds_count" && le=="count" {print $2}'; }
c0=$(b "$m0" count) c1=$(b "$m1" count)
s10=$(( (c1 - $(b "$m1" 0.01)) - (c0 - $(b "$m0" 0.01)) ))
s50=$(( (c1 - $(b "$m1" 0.05)) - (c0 - $(b "$m0" 0.05)) ))
echo "writer=$pol $(echo "$out" | awk '/Requests\/sec/ {r=$2} /99%/ {p=$2} /Latency / {m=$4} END {print "req/s", r, "p99", p, "max", m}') fsyncs $((c1-c0)) over10ms $s10 over50ms $s50"
kill -TERM $SP; wait $SP || true; rm -rf $D
