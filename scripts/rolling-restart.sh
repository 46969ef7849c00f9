#!/usr/bin/env bash
# Rolling restart behind HAProxy, as CI runs it: three tally instances on one fresh
# PostgreSQL database behind deploy/haproxy/haproxy.cfg, steady load through HAProxy for the
# whole test, each instance restarted in turn (SIGTERM, exit 0, start, /readyz, HAProxy
# sees it UP again), then every instance stopped. Passes only if
#   - every response was 202 and wrk saw no socket error (connect, read, write, timeout),
#   - every instance exited 0 on each SIGTERM,
#   - the counters table equals the increments answered 202, in total and key by key.
#
# The load is tally-bench's own wrk script (tally-bench/bench/increment.lua: value 1, then a
# zero tail so that every value-1 request is answered before wrk stops), wrapped to also
# count the value-1 requests per key and the responses per status.
#
# Needs: target/release/tally (built if missing), haproxy, wrk, curl, psql/createdb/dropdb,
# PostgreSQL on 127.0.0.1:5432 as user postgres with trust auth (TALLY_PG_HOST,
# TALLY_PG_PORT, TALLY_PG_USER override). Uses ports 3331-3333 (tally), 18080 (HAProxy)
# and 18404 (HAProxy stats). Takes about a minute.
#
# Knobs (environment): ROLLING_LOAD_SECONDS (45), ROLLING_CONNECTIONS (32), ROLLING_KEYS
# (200), ROLLING_SHUTDOWN_DELAY (3s), TALLY_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bin=${TALLY_BIN:-${CARGO_TARGET_DIR:-target}/release/tally}
pg_host=${TALLY_PG_HOST:-127.0.0.1}
pg_port=${TALLY_PG_PORT:-5432}
pg_user=${TALLY_PG_USER:-postgres}
load_s=${ROLLING_LOAD_SECONDS:-45}
tail_s=3
connections=${ROLLING_CONNECTIONS:-32}
keys=${ROLLING_KEYS:-200}
shutdown_delay=${ROLLING_SHUTDOWN_DELAY:-3s}
ports=(3331 3332 3333)
lb_port=18080
stats_port=18404

say() { printf 'rolling-restart: %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

for tool in haproxy wrk curl psql createdb dropdb; do
    command -v "$tool" >/dev/null || die "$tool is missing (Debian: apt-get install -y haproxy wrk curl postgresql-client)"
done
if [ ! -x "$bin" ]; then
    say "building $bin"
    cargo build --release
fi
"$bin" --help | grep -q -- '--shutdown-delay' ||
    die "$bin has no --shutdown-delay flag: rebuild it (cargo build --release)"
for port in "${ports[@]}" "$lb_port" "$stats_port"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is already in use"
    fi
done

work=$(mktemp -d "${TMPDIR:-/tmp}/tally-rolling.XXXXXX")
db="tally_rolling_$$"
db_url="postgres://${pg_user}@${pg_host}:${pg_port}/${db}"
declare -a pids=()
haproxy_pid=
wrk_pid=
db_created=
passed=

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    [ -n "$wrk_pid" ] && kill "$wrk_pid" 2>/dev/null
    for pid in "${pids[@]}"; do
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        [ -n "$pid" ] || continue
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    done
    [ -n "$haproxy_pid" ] && kill "$haproxy_pid" 2>/dev/null
    wait 2>/dev/null
    if [ -n "$db_created" ]; then
        dropdb -h "$pg_host" -p "$pg_port" -U "$pg_user" --if-exists "$db" 2>/dev/null || true
    fi
    if [ -z "$passed" ]; then
        say "logs kept in $work:"
        for f in "$work"/*.log; do
            [ -f "$f" ] || continue
            printf '\n--- %s (last 25 lines)\n' "$f" >&2
            tail -n 25 "$f" >&2
        done
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

createdb -h "$pg_host" -p "$pg_port" -U "$pg_user" "$db"
db_created=1
# Every start runs this copy: a rebuild of target/ during the test cannot swap binaries.
cp "$bin" "$work/tally"
bin="$work/tally"

# --- tally instances -----------------------------------------------------------------------

start_instance() { # index (0-based)
    local i=$1
    "$bin" --listen "127.0.0.1:${ports[$i]}" --data-dir "$work/data$i" \
        --database-url "$db_url" --shutdown-delay "$shutdown_delay" --flush-interval 200ms \
        >>"$work/tally$i.log" 2>&1 &
    pids[$i]=$!
}

wait_ready() { # index
    local i=$1
    for _ in $(seq 1 300); do
        kill -0 "${pids[$i]}" 2>/dev/null || die "instance $i (port ${ports[$i]}) exited during start-up"
        curl -fsS -o /dev/null "http://127.0.0.1:${ports[$i]}/readyz" 2>/dev/null && return 0
        sleep 0.1
    done
    die "instance $i (port ${ports[$i]}) not ready after 30 s"
}

stop_instance() { # index: SIGTERM, then its exit status must be 0
    local i=$1 status=0
    kill -TERM "${pids[$i]}"
    wait "${pids[$i]}" || status=$?
    pids[$i]=
    [ "$status" -eq 0 ] || die "instance $i (port ${ports[$i]}) exited with $status after SIGTERM"
}

# --- HAProxy, with the shipped configuration ------------------------------------------------

stats_field() { # server-name column -> value, from HAProxy's CSV stats (1-based column)
    curl -fsS "http://127.0.0.1:${stats_port}/stats;csv" 2>/dev/null |
        awk -F, -v sv="$1" -v col="$2" '$1 == "tally" && $2 == sv { print $col }'
}

wait_haproxy_up() { # index: until HAProxy's health checks see the server UP
    local name="tally$(($1 + 1))"
    for _ in $(seq 1 200); do
        kill -0 "$haproxy_pid" 2>/dev/null || die "HAProxy exited (see $work/haproxy.log)"
        [ "$(stats_field "$name" 18)" = "UP" ] && return 0
        sleep 0.1
    done
    die "HAProxy did not see $name UP within 20 s (status: $(stats_field "$name" 18))"
}

# The shipped file with test ports, and HAProxy logging only abnormal requests (not 600k
# lines of 202s).
sed -e "s/^\(    bind \):8080$/\1127.0.0.1:${lb_port}/" \
    -e "s/^\(    bind \)127\.0\.0\.1:8404$/\1127.0.0.1:${stats_port}/" \
    -e "s/^\(    option httplog\)$/\1\n    option dontlog-normal/" \
    deploy/haproxy/haproxy.cfg >"$work/haproxy.cfg"
grep -q "bind 127.0.0.1:${lb_port}$" "$work/haproxy.cfg" &&
    grep -q "bind 127.0.0.1:${stats_port}$" "$work/haproxy.cfg" ||
    die "could not rewrite the bind lines of deploy/haproxy/haproxy.cfg"
for i in 0 1 2; do
    grep -q "^    server tally$((i + 1)) 127.0.0.1:${ports[$i]}$" "$work/haproxy.cfg" ||
        die "deploy/haproxy/haproxy.cfg no longer has 'server tally$((i + 1)) 127.0.0.1:${ports[$i]}'"
done
haproxy -c -q -f "$work/haproxy.cfg" || die "haproxy -c refused the configuration"

for i in 0 1 2; do start_instance "$i"; done
for i in 0 1 2; do wait_ready "$i"; done
haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
for i in 0 1 2; do wait_haproxy_up "$i"; done
say "3 instances and HAProxy up; load for ${load_s}s through 127.0.0.1:${lb_port}"

# --- the load: tally-bench's increment.lua, plus per-key and per-status counts --------------

cat >"$work/count.lua" <<EOF
-- tally-bench/bench/increment.lua, wrapped: per-key count of the value-1 requests and
-- count of responses by status, printed by done() after the script's own line.
dofile("$repo/tally-bench/bench/increment.lua")
local base_setup, base_request, base_done = setup, request, done
local all = {}
per_key = {}
statuses = {}
function setup(thread)
  base_setup(thread)
  table.insert(all, thread)
end
function request()
  local req = base_request()
  local key, value = req:match('"key":"([^"]+)","value":(%d+)')
  if value == "1" then per_key[key] = (per_key[key] or 0) + 1 end
  return req
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  base_done(summary, latency, requests)
  local keys, st = {}, {}
  for _, t in ipairs(all) do
    for k, n in pairs(t:get("per_key")) do keys[k] = (keys[k] or 0) + n end
    for s, n in pairs(t:get("statuses")) do st[s] = (st[s] or 0) + n end
  end
  for k, n in pairs(keys) do io.write("KEY ", k, " ", n, "\n") end
  for s, n in pairs(st) do io.write("STATUS ", s, " ", n, "\n") end
end
EOF

start=$(date +%s)
wrk -t2 -c"$connections" -d"${load_s}s" --latency -s "$work/count.lua" \
    "http://127.0.0.1:${lb_port}/increment" -- "$keys" "$load_s" "$tail_s" \
    >"$work/wrk.out" 2>"$work/wrk.log" &
wrk_pid=$!
sleep 3

# --- the rolling restart --------------------------------------------------------------------

for i in 0 1 2; do
    t0=$(date +%s%3N)
    stop_instance "$i"
    t1=$(date +%s%3N)
    start_instance "$i"
    wait_ready "$i"
    wait_haproxy_up "$i"
    t2=$(date +%s%3N)
    say "instance $i (port ${ports[$i]}): exited 0 $((t1 - t0)) ms after SIGTERM, UP in HAProxy $((t2 - t1)) ms after its start"
done
restarts_done=$(($(date +%s) - start))
kill -0 "$wrk_pid" 2>/dev/null ||
    die "the load stopped before the restarts were done: raise ROLLING_LOAD_SECONDS"
[ "$restarts_done" -le $((load_s - tail_s)) ] ||
    die "the restarts took ${restarts_done}s, into the load's zero tail: raise ROLLING_LOAD_SECONDS"

wrk_status=0
wait "$wrk_pid" || wrk_status=$?
wrk_pid=
[ "$wrk_status" -eq 0 ] || die "wrk exited with $wrk_status"

# Every instance drains into the store on SIGTERM (in parallel: the shutdown delay each).
for i in 0 1 2; do kill -TERM "${pids[$i]}"; done
for i in 0 1 2; do
    status=0
    wait "${pids[$i]}" || status=$?
    pids[$i]=
    [ "$status" -eq 0 ] || die "instance $i (port ${ports[$i]}) exited with $status after the final SIGTERM"
done
retries=$(stats_field BACKEND 16)
redispatches=$(stats_field BACKEND 17)
kill "$haproxy_pid" 2>/dev/null || true
wait "$haproxy_pid" 2>/dev/null || true
haproxy_pid=

# --- the checks -----------------------------------------------------------------------------

line=$(grep '^TALLYBENCH ' "$work/wrk.out") || die "wrk printed no TALLYBENCH line (see $work/wrk.out)"
num() { printf '%s\n' "$line" | grep -o "\"$1\":[0-9]*" | head -n1 | cut -d: -f2; }
sent1=$(num sent1)
requests=$(num requests)
socket_errors=$(($(num connect) + $(num read) + $(num write) + $(num timeout)))
status_errors=$(num status)
max_latency_us=$(printf '%s\n' "$line" | grep -o '"max":[0-9]*' | cut -d: -f2)
answered_202=$(awk '$1 == "STATUS" && $2 == 202 { print $3 }' "$work/wrk.out")
answered_202=${answered_202:-0}
non_202=$(awk '$1 == "STATUS" && $2 != 202 { n += $3 } END { print n + 0 }' "$work/wrk.out")
awk '$1 == "KEY" { print $2, $3 }' "$work/wrk.out" | sort >"$work/expected.txt"
expected_sum=$(awk '{ s += $2 } END { print s + 0 }' "$work/expected.txt")

psql -h "$pg_host" -p "$pg_port" -U "$pg_user" -d "$db" -X -q -At -F ' ' \
    -c "SELECT key, value FROM counters WHERE value <> 0 ORDER BY key" >"$work/stored.raw" ||
    die "could not read the counters table"
sort "$work/stored.raw" >"$work/stored.txt"
stored_sum=$(awk '{ s += $2 } END { print s + 0 }' "$work/stored.txt")
stored_keys=$(wc -l <"$work/stored.txt")
expected_keys=$(wc -l <"$work/expected.txt")

summary="requests=$requests answered_202=$answered_202 non_202=$non_202 socket_errors=$socket_errors"
summary+=" max_latency_ms=$((max_latency_us / 1000)) increments=$sent1 stored_sum=$stored_sum"
summary+=" keys=$stored_keys/$expected_keys haproxy_retries=${retries:-?} redispatches=${redispatches:-?}"
summary+=" restarts=3 load=${load_s}s"

problems=()
[ "$non_202" -eq 0 ] && [ "$status_errors" -eq 0 ] || problems+=("$non_202 responses were not 202 ($(awk '$1 == "STATUS" && $2 != 202 { printf "%s:%s ", $2, $3 }' "$work/wrk.out"))")
[ "$socket_errors" -eq 0 ] || problems+=("$socket_errors socket errors ($(printf '%s\n' "$line" | grep -o '"errors":{[^}]*}'))")
[ "$answered_202" -eq "$requests" ] || problems+=("wrk completed $requests requests but counted $answered_202 answers 202")
[ "$max_latency_us" -lt $((tail_s * 1000000)) ] || problems+=("max latency ${max_latency_us}us is not below the ${tail_s}s zero tail: some value-1 request may be unanswered")
[ "$expected_sum" -eq "$sent1" ] || problems+=("per-key counts sum to $expected_sum, wrk's sent1 is $sent1")
# (With failed requests, the value-1 requests sent are more than those answered 202, and
# the two checks below show by how much the store followed the failures.)
[ "$stored_sum" -eq "$sent1" ] ||
    problems+=("the store holds $stored_sum, the value-1 requests sent were $sent1 (differs by $((stored_sum - sent1)))")
keys_differing=$(diff "$work/expected.txt" "$work/stored.txt" | grep -c '^<' || true)
[ "$keys_differing" -eq 0 ] ||
    problems+=("$keys_differing keys differ between the 202 counts and the store (diff $work/expected.txt $work/stored.txt)")

if [ ${#problems[@]} -gt 0 ]; then
    for p in "${problems[@]}"; do say "check failed: $p"; done
    die "$summary"
fi
passed=1
echo "rolling-restart: PASS $summary"
