#!/usr/bin/env bash
# One tally ack=store vs two (different instance ids, same database), 100,000 keys, 400 connections total.
set -e
cd /work/main
run() { # name db ports...
  :
}
for db in s1 s2; do psql -h 127.0.0.1 -U postgres -Atc "drop database if exists $db" -c "create database $db" >/dev/null 2>&1; done
rm -rf /tmp/s1a /tmp/s2a /tmp/s2b; mkdir -p /tmp/s1a /tmp/s2a /tmp/s2b
RUST_LOG=warn target/release/tally --listen 127.0.0.1:4101 --data-dir /tmp/s1a --ack store --database-url postgres://postgres@127.0.0.1/s1 --instance-id a >/dev/null 2>&1 &
RUST_LOG=warn target/release/tally --listen 127.0.0.1:4102 --data-dir /tmp/s2a --ack store --database-url postgres://postgres@127.0.0.1/s2 --instance-id a >/dev/null 2>&1 &
RUST_LOG=warn target/release/tally --listen 127.0.0.1:4103 --data-dir /tmp/s2b --ack store --database-url postgres://postgres@127.0.0.1/s2 --instance-id b >/dev/null 2>&1 &
sleep 3
L=tally-bench/bench/increment.lua
for p in 4101 4102 4103; do wrk -t2 -c200 -d2s -s $L http://127.0.0.1:$p/increment -- 100000 0 0 >/dev/null; done
for r in 1 2 3; do
  one=$(wrk -t2 -c400 -d8s -s $L http://127.0.0.1:4101/increment -- 100000 0 0 | awk '/Requests\/sec/ {print $2}')
  wrk -t1 -c200 -d8s -s $L http://127.0.0.1:4102/increment -- 100000 0 0 > /tmp/w2a &
  wrk -t1 -c200 -d8s -s $L http://127.0.0.1:4103/increment -- 100000 0 0 > /tmp/w2b
  wait %4 2>/dev/null || sleep 0.5
  a=$(awk '/Requests\/sec/ {print $2}' /tmp/w2a); b=$(awk '/Requests\/sec/ {print $2}' /tmp/w2b)
  echo "round $r: one instance $one req/s; two instances $a + $b = $(echo "$a + $b" | bc) req/s"
done
kill %1 %2 %3
