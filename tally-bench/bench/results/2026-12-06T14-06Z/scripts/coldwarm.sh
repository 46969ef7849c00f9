#!/usr/bin/env bash
# coldwarm.sh ROUNDS ack : per trial a fresh database; "warm" has its 100,000 keys inserted
# (value 0) after tally created the schema, "cold" starts empty. 2 s warm-up, 10 s measured.
rounds=$1 ack=$2
cd /work/main
. tally-bench/bench/lib.sh
ticks=$(getconf CLK_TCK)
for r in $(seq $rounds); do for mode in cold warm; do
  psql -h 127.0.0.1 -U postgres -qc "drop database if exists tally_cw" -c "create database tally_cw" 2>/dev/null
  rm -rf /tmp/cw; mkdir /tmp/cw
  RUST_LOG=warn target/release/tally --listen 127.0.0.1:3995 --data-dir /tmp/cw --ack $ack --database-url postgres://postgres@127.0.0.1/tally_cw --instance-id p >/tmp/cw.log 2>&1 &
  pid=$!
  wait_healthy 127.0.0.1:3995
  if [ $mode = warm ]; then psql -h 127.0.0.1 -U postgres -d tally_cw -qc "insert into counters (key, value) select 'k'||i, 0 from generate_series(0,99999) i" ; fi
  wrk -t2 -c400 -d2s -s tally-bench/bench/increment.lua http://127.0.0.1:3995/increment -- 100000 0 0 >/dev/null
  c0=$(awk '{print $14 + $15}' /proc/$pid/stat)
  out=$(wrk -t2 -c400 -d10s -s tally-bench/bench/increment.lua http://127.0.0.1:3995/increment -- 100000 10 2)
  c1=$(awk '{print $14 + $15}' /proc/$pid/stat)
  reqs=$(awk '/requests in/ {print $1}' <<<"$out"); rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  echo "round $r $ack $mode: $rps req/s, $(python3 -c "print('%.1f' % (($c1-$c0)*1e6/$ticks/$reqs))") us/req"
  kill -TERM $pid; wait $pid
done; done
