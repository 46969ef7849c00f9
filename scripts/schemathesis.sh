#!/usr/bin/env bash
# Runs schemathesis (property-based API testing, from PyPI) against a real tally: every
# operation of GET /openapi.json, with generated valid and invalid inputs, all checks.
#
#   scripts/schemathesis.sh [MAX_EXAMPLES]      default: 50 examples per operation
#
# Installs schemathesis into a virtualenv under target/ (once), builds and starts tally on
# 127.0.0.1 with a temporary data directory and a static bearer token (so 401s are
# exercised too), runs `st run` with scripts/schemathesis.toml and the NDJSON serializer in
# scripts/schemathesis_hooks.py, stops tally. Exit status: schemathesis's.
# Environment: TALLY_BIN to test a prebuilt binary; SCHEMATHESIS_VERSION to pin another.
set -euo pipefail
cd "$(dirname "$0")/.."

max_examples="${1:-50}"
version="${SCHEMATHESIS_VERSION:-4.32.5}"
venv=target/schemathesis-venv
port="${TALLY_SCHEMATHESIS_PORT:-33377}"
token="schemathesis-token-$RANDOM$RANDOM$RANDOM"

if [ ! -x "$venv/bin/st" ] || ! "$venv/bin/st" --version 2>/dev/null | grep -q "$version"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "schemathesis==$version"
fi

if [ -z "${TALLY_BIN:-}" ]; then
    cargo build --quiet --bin tally
    TALLY_BIN=target/debug/tally
fi

data_dir="$(mktemp -d)"
log="$data_dir/tally.log"
cleanup() {
    if [ -n "${tally_pid:-}" ] && kill -0 "$tally_pid" 2>/dev/null; then
        kill -TERM "$tally_pid"
        wait "$tally_pid" || true
    fi
    rm -rf "$data_dir"
}
trap cleanup EXIT

TALLY_AUTH_TOKEN="$token" "$TALLY_BIN" \
    --listen "127.0.0.1:$port" --data-dir "$data_dir" --ack memory \
    --flush-interval 200ms >"$log" 2>&1 &
tally_pid=$!

for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$tally_pid" 2>/dev/null; then
        echo "schemathesis.sh: tally did not start:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.1
done

set +e
SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}" \
"$venv/bin/st" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$port/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks all \
    --max-examples "$max_examples" \
    --phases examples,coverage,fuzzing,stateful \
    --request-timeout 10 \
    ${SCHEMATHESIS_SEED:+--seed "$SCHEMATHESIS_SEED"}
status=$?
set -e
if [ "$status" -ne 0 ]; then
    echo "schemathesis.sh: failures; tally's log: $log (kept)" >&2
    trap - EXIT
    kill -TERM "$tally_pid" 2>/dev/null || true
    wait "$tally_pid" || true
fi
exit "$status"
