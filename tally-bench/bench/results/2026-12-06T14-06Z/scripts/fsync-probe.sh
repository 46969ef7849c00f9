#!/usr/bin/env bash
# usage: fsync-probe.sh KEYS extra-args...
keys=$1; shift
cd /work/main
psql -h 127.0.0.1 -U postgres -qc "drop database if exists tally_ab" -c "create database tally_ab" 2>/dev/null
rm -rf /tmp/fp; mkdir -p /tmp/fp
RUST_LOG=warn target/release/tally --listen 127.0.0.1:3998 --data-dir /tmp/fp "$@" >/tmp/fp.log 2>&1 &
pid=$!
. tally-bench/bench/lib.sh
wait_healthy 127.0.0.1:3998
wrk -t2 -c400 -d2s -s tally-bench/bench/increment.lua http://127.0.0.1:3998/increment -- $keys 0 0 >/dev/null
curl -s 127.0.0.1:3998/metrics | grep -E "^tally_journal_(fsync_seconds|group_size)_(sum|count)" > /tmp/fp.m0
read -r _ u n s i rest < <(head -1 /proc/stat)
wrk -t2 -c400 -d15s -s tally-bench/bench/increment.lua http://127.0.0.1:3998/increment -- $keys 0 0 | grep -E "Requests/sec|99%"
read -r _ u2 n2 s2 i2 rest < <(head -1 /proc/stat)
echo "idle cores: $(( (i2-i)*100/1500 ))/100"
curl -s 127.0.0.1:3998/metrics | grep -E "^tally_journal_(fsync_seconds|group_size)_(sum|count)" > /tmp/fp.m1
paste /tmp/fp.m0 /tmp/fp.m1 | awk '{d[$1]=$4-$2} END {printf "fsyncs %d, mean fsync %.2f ms, mean group %.0f\n", d["tally_journal_fsync_seconds_count"], 1000*d["tally_journal_fsync_seconds_sum"]/d["tally_journal_fsync_seconds_count"], d["tally_journal_group_size_sum"]/d["tally_journal_group_size_count"]}'
curl -s 127.0.0.1:3998/metrics | grep -E "^tally_journal_fsync_seconds_bucket" | tr '\n' ' '; echo
kill -TERM $pid; wait $pid
