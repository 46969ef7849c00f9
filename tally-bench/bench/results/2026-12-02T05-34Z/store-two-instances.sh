#!/usr/bin/env bash
# Would two ack=store batches in flight help? One tally (ack=store) on its own database
# against two (instance ids a and b, each with its own serial flusher) sharing one database;
# 100,000 keys, 400 connections in all, 3 rounds of 8 s. Run from the repository root after
# `cargo build --release`; needs PostgreSQL on 127.0.0.1:5432 (trust auth) and wrk.
set -euo pipefail
lua=tally-bench/bench/increment.lua
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for db in s1 s2; do
    psql -h 127.0.0.1 -U postgres -Atq -c "drop database if exists $db" -c "create database $db"
done
serve() { # port database instance-id
    local dir
    dir=$(mktemp -d)
    RUST_LOG=warn target/release/tally --listen "127.0.0.1:$1" --data-dir "$dir" --ack store \
        --database-url "postgres://postgres@127.0.0.1/$2" --instance-id "$3" >/dev/null 2>&1 &
    pids+=($!)
}
serve 4101 s1 a
serve 4102 s2 a
serve 4103 s2 b
sleep 3
rate() { awk '/Requests\/sec/ {print $2}'; }
for port in 4101 4102 4103; do # warm-up, posting zeros
    wrk -t2 -c200 -d2s -s "$lua" "http://127.0.0.1:$port/increment" -- 100000 0 0 >/dev/null
done
for round in 1 2 3; do
    one=$(wrk -t2 -c400 -d8s -s "$lua" http://127.0.0.1:4101/increment -- 100000 0 0 | rate)
    out=$(mktemp)
    wrk -t1 -c200 -d8s -s "$lua" http://127.0.0.1:4102/increment -- 100000 0 0 >"$out" &
    b=$(wrk -t1 -c200 -d8s -s "$lua" http://127.0.0.1:4103/increment -- 100000 0 0 | rate)
    wait $!
    a=$(rate <"$out")
    echo "round $round: one instance $one req/s; two instances $a + $b = $(echo "$a + $b" | bc) req/s"
done
