#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a fixed time each and reports executions and findings. Not part of
# CI's critical path: it needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`).
#
#   scripts/fuzz.sh [seconds per target, default 120] [target ...]
#
# Corpora persist in fuzz/corpus/<target>, crashes land in fuzz/artifacts/<target>; a finding exits non-zero after
# all targets ran.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-120}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O
found=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$(mktemp)"
    status=0
    # -rss_limit_mb: the generous arenas plus ASan shadow memory; -max_len: enough bytes for every field.
    cargo +nightly fuzz run -O "$t" -- -max_total_time="$seconds" -rss_limit_mb=4096 -max_len=4096 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)"
    crashes="$(find "artifacts/$t" -type f | wc -l)"
    echo "$t: ${seconds}s, $execs executions, ${cov:-cov: ?}, $crashes artifact(s), exit $status"
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        found=1
        grep -E 'ERROR|panicked|SUMMARY' "$log" | head -5 || true
    fi
    rm -f "$log"
done
exit "$found"
