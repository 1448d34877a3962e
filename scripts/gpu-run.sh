#!/usr/bin/env bash
# Runs on the device machine (H100) from the repository root, after scripts/gpu-build.sh ran here:
#
#   run(command: "scripts/gpu-run.sh", carry: ["gpu-bin"])
#
# Steps (each under a time limit, logs in $OUT): the GPU tests with FLASHMLA_REQUIRE_GPU=1 (a skip is a failure),
# the conformance suite on cpu and hopper, the cuda_decode example (device memory through flashmla::cuda),
# compute-sanitizer memcheck and racecheck on the reduced set (FLASHMLA_QUICK=1), the benchmark on upstream's grid
# (`flashmla bench --backend hopper`, table in bench.log, all of it in bench.json) and the small-batch latencies
# (`--grid small`, small.log / small.json), the `flashmla` CLI on the hopper backend (demo per dtype, and
# `decode --backend hopper` against `--backend cpu` on the same .npy files), and the Python package's tests with
# PyTorch on CUDA. The last lines printed are the summary. Pick steps with
# GPU_STEPS="tests conformance example memcheck racecheck bench small cli python" and extra bench flags with BENCH_ARGS / SMALL_ARGS
# (e.g. BENCH_ARGS="--dtype e4m3 --sk 4096"; `flashmla help` lists them). The python step needs the wheel in
# gpu-bin/python (scripts/build-wheel.sh gpu-bin/python).
#
# Against upstream (steps `host`, `interleaved`, `ncu-py`; not in the default list), after the python step or
# ../shared/upstream's side-by-side.sh installed the wheel in /tmp/fm/site-packages and built upstream in $UPSTREAM
# (default /tmp/up/fm9): python/benchmarks/host_cost.py (where the host time of a call goes, both libraries),
# python/benchmarks/interleaved.py (both kernels on the same tensors in one process, with the SM clock and power of
# each timing window), ncu's full set on both split kernels over those same tensors (`ncu-py`, NCU_PY_CASE, default
# 128x4096x128x2) and the GPU time of each kernel of a scheduler step and three decode calls of both libraries on
# small shapes (`ncu-small`, NCU_SMALL_CASES).
#
# Kernel A/B (step `ab`, not in the default list): every $BIN/variants/NAME.cubin (split kernels compiled with other
# compile-time switches, see docs/gpu.md) is loaded through FLASHMLA_HOPPER_SPLITKV_CUBIN in turn, AB_ROUNDS times
# (default 2, interleaved, so the spread between rounds shows the noise): the E4M3 large-logit accuracy test, then
# `flashmla bench --backend hopper $AB_ARGS`. With $BIN/anchors-h200.json present, the summary adds each row's ratio
# to upstream's H200 figure. GPU_BIN picks another folder than gpu-bin. Logs are packed into $OUT/logs.tgz at the end
# (the device tool returns at most 8 files).
#
# Programmatic dependent launch A/B (step `pdl`, not in the default list): with FLASHMLA_HOPPER_PDL=1 the GPU tests
# (graph replay included), memcheck and racecheck, then `flashmla bench --grid small` and $PDL_ARGS on the upstream
# grid with PDL off and on, PDL_ROUNDS times (default 2) interleaved.
set -uo pipefail
OUT="${OUT:-/tmp/flashmla-gpu}"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
BIN="${GPU_BIN:-gpu-bin}"
STEPS="${GPU_STEPS:-tests conformance example memcheck racecheck bench small cli python}"
AB_ARGS="${AB_ARGS:---dtype bf16,e4m3 --sk 4096,16384 --h-q 16,128 --s-q 1,2 --varlen fixed}"
AB_ROUNDS="${AB_ROUNDS:-2}"
PDL_ARGS="${PDL_ARGS:---dtype bf16,e4m3 --sk 4096 --h-q 16,128 --s-q 1 --varlen fixed}"
PDL_ROUNDS="${PDL_ROUNDS:-2}"
UPSTREAM="${UPSTREAM:-/tmp/up/fm9}"
pack_logs() { (cd "$OUT" && tar czf logs.tgz logs && rm -rf logs); }
trap pack_logs EXIT
ROOT="$PWD"
export FLASHMLA_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$LOGS/device.txt"
declare -A RC
for step in $STEPS; do
  case "$step" in
    tests) timeout 240 "$BIN/hopper-gpu-tests" --test-threads=1 --nocapture >"$LOGS/tests.log" 2>&1 ;;
    # The conformance suite on every backend (cpu against its insta snapshots in this checkout, hopper against the
    # float64 reference) and the example decoding from device memory through flashmla::cuda.
    conformance) INSTA_WORKSPACE_ROOT="$ROOT" timeout 240 "$BIN/conformance-tests" --test-threads=1 --nocapture \
        >"$LOGS/conformance.log" 2>&1 ;;
    example) timeout 60 "$BIN/cuda_decode" hopper >"$LOGS/example.log" 2>&1 ;;
    memcheck) FLASHMLA_QUICK=1 timeout "${SAN_TIMEOUT:-200}" compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$BIN/hopper-gpu-tests" --test-threads=1 --nocapture >"$LOGS/memcheck.log" 2>&1 ;;
    racecheck) FLASHMLA_QUICK=1 timeout "${SAN_TIMEOUT:-200}" compute-sanitizer --tool racecheck --error-exitcode 9 \
        "$BIN/hopper-gpu-tests" --test-threads=1 --nocapture decode_matches_reference >"$LOGS/racecheck.log" 2>&1 ;;
    bench) timeout 300 "$BIN/flashmla" bench --backend hopper --json "$LOGS/bench.json" ${BENCH_ARGS:-} \
        >"$LOGS/bench.log" 2>&1 ;;
    small) timeout 120 "$BIN/flashmla" bench --backend hopper --grid small --json "$LOGS/small.json" ${SMALL_ARGS:-} \
        >"$LOGS/small.log" 2>&1 ;;
    cli) timeout 240 bash scripts/gpu-cli-check.sh "$BIN/flashmla" >"$LOGS/cli.log" 2>&1 ;;
    python) (python3 -m pip install -q --no-index --no-deps --target /tmp/fm/site-packages "$BIN"/python/flashmla-*.whl &&
        cd /tmp/fm && PYTHONPATH=/tmp/fm/site-packages FLASHMLA_EXPECT_INSTALLED=1 FLASHMLA_REPO_ROOT="$ROOT" \
        PYTHONUNBUFFERED=1 timeout 240 python3 -m pytest -p no:cacheprovider -ra "$ROOT/python/tests") >"$LOGS/python.log" 2>&1 ;;
    ncu) # Hardware counters of one split-kernel launch per NCU_CASES entry ("variant|bench flags"; variant = a cubin
        # name in $BIN/variants or "default"), clocks left alone.
        IFS=';' read -ra cases <<<"${NCU_CASES:-default|--dtype bf16 --sk 4096 --h-q 128 --s-q 2}"
        for c in "${cases[@]}"; do
          v="${c%%|*}"
          cubin=""
          [[ "$v" != default ]] && cubin="$BIN/variants/$v.cubin"
          echo "== ncu $c" >>"$LOGS/ncu.log"
          env ${cubin:+FLASHMLA_HOPPER_SPLITKV_CUBIN="$cubin"} timeout 120 ncu --clock-control none -k regex:mla_splitkv -c 1 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
            "$BIN/flashmla" bench --backend hopper ${c#*|} --varlen fixed --iters 1 --sets 1 --no-ceilings \
            >>"$LOGS/ncu.log" 2>&1
        done ;;
    host|interleaved|ncu-py|ncu-small) # Need the wheel in /tmp/fm/site-packages (the python step, or side-by-side.sh) and
        # upstream built in $UPSTREAM (side-by-side.sh builds /tmp/up/fm9).
        export PYTHONPATH=/tmp/fm/site-packages
        case "$step" in
          host) timeout 120 python3 python/benchmarks/host_cost.py --upstream "$UPSTREAM" >"$LOGS/host.log" 2>&1 ;;
          interleaved) timeout 240 python3 python/benchmarks/interleaved.py --upstream "$UPSTREAM" \
              >"$LOGS/interleaved.log" 2>&1 ;;
          ncu-py) # Both libraries' split kernels on identical inputs (the second launch of each), clocks left alone.
            for lib in upstream flashmla; do
              echo "== ncu-py $lib ${NCU_PY_CASE:-128x4096x128x2}" >>"$LOGS/ncu-py.log"
              timeout 150 ncu --clock-control none -k regex:splitkv --launch-skip 1 -c 1 --set full --import-source no \
                python3 python/benchmarks/interleaved.py --upstream "$UPSTREAM" --once "$lib" \
                --cases "${NCU_PY_CASE:-128x4096x128x2}" >>"$LOGS/ncu-py.log" 2>&1
            done ;;
          ncu-small) # GPU time of every kernel of one scheduler step and three decode calls, both libraries.
            for c in ${NCU_SMALL_CASES:-1x64x16x1 8x1024x128x1 128x4096x16x1}; do
              for lib in upstream flashmla; do
                echo "== ncu-small $lib $c" >>"$LOGS/ncu-small.log"
                timeout 60 ncu --clock-control none -k regex:"mla|flash" -c 7 --metrics gpu__time_duration.sum \
                  python3 python/benchmarks/interleaved.py --upstream "$UPSTREAM" --once "$lib" --cases "$c" 2>&1 |
                  grep -E "^  [a-zA-Z_ ]*(mla|flash)[a-zA-Z_]*|gpu__time_duration" >>"$LOGS/ncu-small.log"
              done
            done ;;
        esac ;;
    pdl) { FLASHMLA_HOPPER_PDL=1 timeout 240 "$BIN/hopper-gpu-tests" --test-threads=1 --nocapture 2>&1 | sed 's/^/tests: /'
        FLASHMLA_HOPPER_PDL=1 FLASHMLA_QUICK=1 timeout "${SAN_TIMEOUT:-200}" compute-sanitizer --tool memcheck \
          --error-exitcode 9 "$BIN/hopper-gpu-tests" --test-threads=1 2>&1 | sed 's/^/memcheck: /'
        FLASHMLA_HOPPER_PDL=1 FLASHMLA_QUICK=1 timeout "${SAN_TIMEOUT:-200}" compute-sanitizer --tool racecheck \
          --error-exitcode 9 "$BIN/hopper-gpu-tests" --test-threads=1 decode_matches_reference 2>&1 | sed 's/^/racecheck: /'
        for round in $(seq 1 "$PDL_ROUNDS"); do
          for pdl in 0 1; do
            echo "== round $round FLASHMLA_HOPPER_PDL=$pdl"
            FLASHMLA_HOPPER_PDL=$pdl timeout 120 "$BIN/flashmla" bench --backend hopper --grid small \
              --json "$LOGS/pdl$pdl-small-r$round.json" 2>&1
            FLASHMLA_HOPPER_PDL=$pdl timeout 120 "$BIN/flashmla" bench --backend hopper \
              --json "$LOGS/pdl$pdl-grid-r$round.json" $PDL_ARGS 2>&1
          done
        done; } >"$LOGS/pdl.log" 2>&1 ;;
    ab) for round in $(seq 1 "$AB_ROUNDS"); do
          for cubin in "$BIN"/variants/*.cubin; do
            v=$(basename "$cubin" .cubin)
            echo "== round $round variant $v" >>"$LOGS/ab.log"
            if [[ "$round" == 1 ]]; then
              FLASHMLA_HOPPER_SPLITKV_CUBIN="$cubin" timeout 60 "$BIN/hopper-gpu-tests" --test-threads=1 --nocapture \
                e4m3_lse_within_bound_on_large_logits 2>&1 | grep -E "^e4m3 amp|test result" >>"$LOGS/ab.log"
            fi
            FLASHMLA_HOPPER_SPLITKV_CUBIN="$cubin" timeout 120 "$BIN/flashmla" bench --backend hopper \
              --json "$LOGS/ab-$v-r$round.json" $AB_ARGS >>"$LOGS/ab.log" 2>&1
          done
        done ;;
  esac
  RC[$step]=$?
done
echo "=================== summary ==================="
for step in $STEPS; do
  log="$LOGS/$step.log"
  echo "--- $step: exit ${RC[$step]}"
  case "$step" in
    tests) grep -E "^test |test result|FAIL|panicked|e4m3 worst|^e4m3 amp|scheduler:|replay" "$log" | head -40 ;;
    conformance) grep -E "^test |test result|panicked|skipp|conformance:" "$log" | head -20 ;;
    example) cat "$log" ;;
    memcheck|racecheck) grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|Invalid|Race" "$log" | head -12 ;;
    bench) grep -vE "^\s*$" "$log" | tail -160 ;;
    small) grep -vE "^\s*$" "$log" | tail -60 ;;
    cli) grep -E "^(==|time:|check|PASS|FAIL|cos|max|  |backend|error)" "$log" | head -60 ;;
    python) grep -E "passed|failed|error|SKIP|FAIL" "$log" | tail -15 ;;
    host) cat "$log" ;;
    interleaved) grep -vE "^\s*$" "$log" | tail -30 ;;
    ncu-py) grep -E "^== ncu|^  [a-z_]+splitkv|Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|Executed Ipc A|Registers Per|Achieved Occupancy|Shared Memory Configuration Size|Issue Slots Busy|No Eligible|L1/TEX Hit|Max Bandwidth|Active Warps Per" "$log" | head -70 ;;
    ncu-small) python3 - "$log" <<'PY'
import re, sys
name, rows = None, []
for line in open(sys.argv[1]):
    if line.startswith("== "):
        rows.append([line[3:].strip(), []])
    elif "gpu__time_duration" in line and name:
        unit, value = line.split()[-2:]
        rows[-1][1].append(f"{name} {value} {unit}")
    else:
        m = re.match(r"\s+(?:void )?([A-Za-z_]+)", line)
        name = m.group(1)[:28] if m else None
for head, ks in rows:
    print(head + ": " + ", ".join(ks))
PY
        ;;
    pdl) grep -E "^(tests|memcheck|racecheck): (test result|.*FAIL|.*panicked|.*ERROR SUMMARY|.*RACECHECK SUMMARY)|^== round" "$log" | head -30
        grep -vE "^(tests|memcheck|racecheck):|^\s*$" "$log" | tail -120 ;;
    ncu) grep -E "^== ncu|Throughput|Duration|Busy|Pipe|Hit Rate|Bandwidth|Executed Ipc|Issue Slots|Mem Busy" "$log" | head -60 ;;
    ab) grep -E "^== |^e4m3 amp|test result|copy ceiling" "$log" | head -60
        python3 - "$LOGS" "$BIN/anchors-h200.json" <<'PY'
import glob, json, os, sys
logs, anchors_path = sys.argv[1], sys.argv[2]
up = {}
if os.path.exists(anchors_path):
    for r in json.load(open(anchors_path))["rows"]:
        up[(r["dtype"], r["s_k"], r["h_q"], r["s_q"], r["varlen"])] = r["ms"]
runs = {}
for f in sorted(glob.glob(f"{logs}/ab-*-r*.json")):
    name = os.path.basename(f)[3:-5]
    v, rnd = name.rsplit("-r", 1)
    for r in json.load(open(f))["results"]:
        key = (r["dtype"], r["s_k"], r["h_q"], r["s_q"], r["mode"] == "varlen")
        runs.setdefault(key, {}).setdefault(v, []).append(r)
variants = sorted({v for d in runs.values() for v in d})
print("ms per variant (rounds: min / max); ratio = upstream H200 ms / best round")
print(f"{'dtype':5} {'s_k':>5} {'h_q':>3} {'s_q':>3} {'mode':6} " + " ".join(f"{v:>22}" for v in variants) + "   up_ms")
for key in sorted(runs):
    cells = []
    for v in variants:
        rs = runs[key].get(v, [])
        if not rs:
            cells.append(f"{'-':>22}")
            continue
        ms = sorted(r["ms"] for r in rs)
        best = min(rs, key=lambda r: r["ms"])
        ratio = up.get(key)
        rat = f"{ratio / ms[0]:.3f}" if ratio else "-"
        cells.append(f"{ms[0]:.4f}/{ms[-1]:.4f} {rat:>5}/{best['tflops']:>4.0f}T"[:22].rjust(22))
    print(f"{key[0]:5} {key[1]:>5} {key[2]:>3} {key[3]:>3} {'varlen' if key[4] else 'fixed':6} " + " ".join(cells)
          + f"   {up.get(key, '-')}")
PY
        ;;
  esac
done
