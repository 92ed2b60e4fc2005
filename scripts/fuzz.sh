#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time and reports executions per target.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]     (default: 60 s, all targets)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# Each target starts from the checked-in corpus (fuzz/corpus/<target>) and the seeds
# (fuzz/seeds/<target>); inputs it discovers go to a scratch directory (kept: its path is
# printed), never into the checked-in corpus. fuzz/regressions/ is replayed by
# `cargo test` only (an open bug there would stop the run at its first input). Exits non-zero if any target crashed, hung or ran out of memory;
# the crashing input is under fuzz/artifacts/<target>/. See docs/FUZZING.md.
set -euo pipefail

cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(mqtt_decode connect_auth journal_recover)
fi
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [seconds-per-target] [target...]" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz on the nightly toolchain is needed: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

# Release build with debug assertions and overflow checks (arithmetic overflow is a
# finding), no sanitizer: the crates forbid `unsafe`, so ASan would only cost speed.
flags=(-O -a -s none)
cargo +nightly fuzz build "${flags[@]}"

# journal_recover creates a journal directory per execution: keep them in memory, and
# inside the scratch directory (a crash leaves its journal directory behind).
base="${TMPDIR:-/tmp}"
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
    base=/dev/shm
fi
scratch="$(mktemp -d "$base/edge-gateway-fuzz.XXXXXX")"
mkdir -p "$scratch/tmp"
export TMPDIR="$scratch/tmp"
summary=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
    corpora=("$scratch/$t")
    for d in "fuzz/corpus/$t" "fuzz/seeds/$t"; do
        if [ -d "$d" ]; then corpora+=("$d"); fi
    done
    log="$scratch/$t.log"
    echo "== $t: ${secs}s (log: $log)"
    status=ok
    if ! cargo +nightly fuzz run "${flags[@]}" "$t" "${corpora[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1; then
        status=FAILED
        failed=1
        grep -E "^==[0-9]+== ERROR|panicked at|Test unit written to|SUMMARY" "$log" | head -20 || true
    fi
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    rss="$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)"
    cov="$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)"
    summary+=("$(printf '%-16s %-7s %12s execs %8s exec/s  %s  rss %s MB' \
        "$t" "$status" "${execs:-?}" "${rate:-?}" "${cov:-}" "${rss:-?}")")
done

rm -rf "$scratch/tmp"
echo
echo "fuzz summary (${secs}s per target; new inputs in $scratch):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
