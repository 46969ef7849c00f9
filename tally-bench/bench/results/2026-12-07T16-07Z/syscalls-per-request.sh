#!/usr/bin/env bash
# Counts a server's system calls under the full workload's load (100,000 keys), the data
# behind syscalls-memory-vs-journal-full-pg.txt. Run from the repository's root:
#
#   syscalls-per-request.sh NAME 'COMMAND'    (COMMAND listens on $ADDR, data in $DIR)
#
# wrk -t2 -c400 for 14 s (increment.lua, value 0); perf stat counts 8 s of it from the 3rd s.
set -euo pipefail
here=tally-bench/bench
. "$here/lib.sh"
export ADDR=127.0.0.1:$(free_port) DIR=$(mktemp -d)
RUST_LOG=warn bash -c "exec $2" >"/tmp/sysc-$1.log" 2>&1 &
pid=$!
wait_healthy "$ADDR"
wrk -t2 -c400 -d14s -s "$here/increment.lua" "http://$ADDR/increment" -- 100000 0 0 >"/tmp/sysc-$1.wrk" &
load=$!
sleep 3
perf stat -o "/tmp/sysc-$1.stat" -p "$pid" -e 'syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_fdatasync,syscalls:sys_enter_pwrite64,syscalls:sys_enter_sched_yield,syscalls:sys_enter_accept4,raw_syscalls:sys_enter' -- sleep 8
wait "$load" || true
kill -TERM "$pid"; wait "$pid" || true
echo "== $1 $(grep Requests/sec "/tmp/sysc-$1.wrk")"
awk '/syscalls|raw_syscalls/ {print $1, $2}' "/tmp/sysc-$1.stat"
