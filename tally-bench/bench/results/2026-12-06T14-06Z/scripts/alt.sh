#!/usr/bin/env bash
# alt.sh KEYS ROUNDS -- cmd...  : one server, alternate value-0 and value-1 loads, 10 s each
keys=$1 rounds=$2; shift 3
cd /work/main
RUST_LOG=warn "$@" >/tmp/alt.log 2>&1 &
pid=$!
. tally-bench/bench/lib.sh
wait_healthy 127.0.0.1:3996
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' /proc/$pid/stat; }
for r in $(seq $rounds); do for args in "0 0" "10 2"; do
  c0=$(cpu); read -r _ u n s i rest < <(head -1 /proc/stat)
  out=$(wrk -t2 -c400 -d10s -s tally-bench/bench/increment.lua http://127.0.0.1:3996/increment -- $keys $args)
  c1=$(cpu); read -r _ u2 n2 s2 i2 rest < <(head -1 /proc/stat)
  reqs=$(awk '/requests in/ {print $1}' <<<"$out"); rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  echo "round $r args '$args': $rps req/s, $(python3 -c "print('%.1f' % (($c1-$c0)*1e6/$ticks/$reqs))") us/req, idle cores $(python3 -c "print('%.2f' % (($i2-$i)/$ticks/10))")"
done; done
kill -TERM $pid; wait $pid
