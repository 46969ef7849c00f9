#!/usr/bin/env bash
# Smoke run of the benchmark: every variant once, short, plus the component
# benchmarks, in under two minutes. Asserts nothing about speed: it fails only when a
# correctness check fails (the store's total differs from the increments answered 202),
# when a server cannot start or stop cleanly, or when a tool is missing.
#
# Needs wrk (installed here if missing and we are root) and PostgreSQL on 127.0.0.1:5432
# (override with TALLY_BENCH_PG_ADMIN_URL). Uses the release build of target/ (or of
# CARGO_TARGET_DIR), the one the README's `cargo run --release` makes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench-quick: wrk is missing; installing it with apt-get" >&2
        apt-get update -qq && apt-get install -y -qq wrk >/dev/null
    else
        echo "bench-quick: wrk is missing: install it with 'apt-get install -y wrk'" >&2
        exit 1
    fi
fi

cargo build --release --bin tally --bin tally-bench
exec "${CARGO_TARGET_DIR:-target}/release/tally-bench" --quick "$@"
