#!/usr/bin/env bash
# pstat.sh NAME KEYS -- cmd...   (cmd listens on 127.0.0.1:3997)
name=$1 keys=$2; shift 3
cd /work/main
RUST_LOG=warn "$@" >/tmp/pstat-$name.log 2>&1 &
pid=$!
. tally-bench/bench/lib.sh
wait_healthy 127.0.0.1:3997
wrk -t2 -c400 -d2s -s tally-bench/bench/increment.lua http://127.0.0.1:3997/increment -- $keys 0 0 >/dev/null
wrk -t2 -c400 -d12s -s tally-bench/bench/increment.lua http://127.0.0.1:3997/increment -- $keys 12 2 > /tmp/pstat-$name.wrk &
w=$!
sleep 2
ev=syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_pwrite64,syscalls:sys_enter_fdatasync,syscalls:sys_enter_sendto,syscalls:sys_enter_clock_nanosleep,sched:sched_switch,sched:sched_wakeup,task-clock
perf stat -e $ev -p $pid -x, -o /tmp/pstat-$name.txt -- sleep 8
wait $w
r=$(awk '/Requests\/sec/{print $2}' /tmp/pstat-$name.wrk)
echo "$name: $r req/s"
awk -F, -v r=$r '$1 ~ /^[0-9.]+$/ {printf "  %-40s %8.4f per req\n", $3, $1/(r*8)}' /tmp/pstat-$name.txt
kill -TERM $pid; wait $pid
