#!/usr/bin/env bash
# Runs on the device machine (H100) from the repository root, after scripts/gpu-build.sh ran here:
#
#   run(command: "scripts/gpu-run.sh", carry: ["gpu-bin"])
#
# Steps (each under a time limit, logs in $OUT): the GPU tests with FLASHMLA_REQUIRE_GPU=1 (a skip is a failure),
# compute-sanitizer memcheck and racecheck on the reduced set (FLASHMLA_QUICK=1), the benchmark on upstream's grid
# (`flashmla bench --backend hopper`, table in bench.log, all of it in bench.json) and the small-batch latencies
# (`--grid small`, small.log / small.json), the `flashmla` CLI on the hopper backend (demo per dtype, and
# `decode --backend hopper` against `--backend cpu` on the same .npy files), and the Python package's tests with
# PyTorch on CUDA. The last lines printed are the summary. Pick steps with
# GPU_STEPS="tests memcheck racecheck bench small cli python" and extra bench flags with BENCH_ARGS / SMALL_ARGS
# (e.g. BENCH_ARGS="--dtype e4m3 --sk 4096"; `flashmla help` lists them). The python step needs the wheel in
# gpu-bin/python (scripts/build-wheel.sh gpu-bin/python).
set -uo pipefail
OUT="${OUT:-/tmp/flashmla-gpu}"
mkdir -p "$OUT"
BIN=gpu-bin
STEPS="${GPU_STEPS:-tests memcheck racecheck bench small cli python}"
ROOT="$PWD"
export FLASHMLA_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
declare -A RC
for step in $STEPS; do
  case "$step" in
    tests) timeout 240 "$BIN/hopper-gpu-tests" --test-threads=1 --nocapture >"$OUT/tests.log" 2>&1 ;;
    memcheck) FLASHMLA_QUICK=1 timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$BIN/hopper-gpu-tests" --test-threads=1 --nocapture >"$OUT/memcheck.log" 2>&1 ;;
    racecheck) FLASHMLA_QUICK=1 timeout 200 compute-sanitizer --tool racecheck --error-exitcode 9 \
        "$BIN/hopper-gpu-tests" --test-threads=1 --nocapture decode_matches_reference >"$OUT/racecheck.log" 2>&1 ;;
    bench) timeout 300 "$BIN/flashmla" bench --backend hopper --json "$OUT/bench.json" ${BENCH_ARGS:-} \
        >"$OUT/bench.log" 2>&1 ;;
    small) timeout 120 "$BIN/flashmla" bench --backend hopper --grid small --json "$OUT/small.json" ${SMALL_ARGS:-} \
        >"$OUT/small.log" 2>&1 ;;
    cli) timeout 240 bash scripts/gpu-cli-check.sh "$BIN/flashmla" >"$OUT/cli.log" 2>&1 ;;
    python) (python3 -m pip install -q --no-index --no-deps --target /tmp/fm/site-packages "$BIN"/python/flashmla-*.whl &&
        cd /tmp/fm && PYTHONPATH=/tmp/fm/site-packages FLASHMLA_EXPECT_INSTALLED=1 FLASHMLA_REPO_ROOT="$ROOT" \
        PYTHONUNBUFFERED=1 timeout 240 python3 -m pytest -p no:cacheprovider -ra "$ROOT/python/tests") >"$OUT/python.log" 2>&1 ;;
  esac
  RC[$step]=$?
done
echo "=================== summary ==================="
for step in $STEPS; do
  log="$OUT/$step.log"
  echo "--- $step: exit ${RC[$step]}"
  case "$step" in
    tests) grep -E "^test |test result|FAIL|panicked|e4m3 worst|scheduler:|replay" "$log" | head -40 ;;
    memcheck|racecheck) grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|Invalid|Race" "$log" | head -12 ;;
    bench) grep -vE "^\s*$" "$log" | tail -160 ;;
    small) grep -vE "^\s*$" "$log" | tail -60 ;;
    cli) grep -E "^(==|time:|check|PASS|FAIL|cos|max|  |backend|error)" "$log" | head -60 ;;
    python) grep -E "passed|failed|error|SKIP|FAIL" "$log" | tail -15 ;;
  esac
done
