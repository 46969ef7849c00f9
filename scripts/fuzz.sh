#!/usr/bin/env bash
# Fuzzes tally's parsers of untrusted bytes with cargo-fuzz (libFuzzer), each target for a
# bounded time, and keeps every crasher as a regression input.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#
# Targets (fuzz/fuzz_targets/): body_json, body_form, body_ndjson (tally::http::body
# parse_one / parse_many) and journal_record (tally::journal::record::decode).
# Needs a nightly toolchain (cargo fuzz builds with sanitizers) and cargo-fuzz, which is
# installed from crates.io when missing. Seeds live in fuzz/seeds/<target>; the growing
# corpus in fuzz/corpus/<target> (not committed). A crash is copied to
# fuzz/regressions/<target>-<name>, which `cargo test --test hardening` replays on stable:
# commit it with the fix.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: cargo fuzz needs a nightly toolchain (rustup toolchain install nightly)." >&2
    echo "fuzz.sh: without one, tests/hardening/parsers.rs runs the same parsers on random input." >&2
    exit 2
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

mkdir -p fuzz/regressions
failed=()
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    echo "=== fuzzing $target for ${seconds}s"
    if ! cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1; then
        failed+=("$target")
    fi
    for crash in fuzz/artifacts/"$target"/crash-* fuzz/artifacts/"$target"/oom-* \
                 fuzz/artifacts/"$target"/timeout-*; do
        [ -e "$crash" ] || continue
        cp "$crash" "fuzz/regressions/$target-$(basename "$crash")"
        echo "=== kept $crash as fuzz/regressions/$target-$(basename "$crash")"
    done
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/regressions/)" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${#targets[@]} target(s), ${seconds}s each."
