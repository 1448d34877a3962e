#!/usr/bin/env bash
# Builds the Hopper GPU tests, the conformance suite (tests/tests/conformance.rs), the cuda_decode example and the
# `flashmla` CLI (whose `bench --backend hopper` is the Hopper benchmark) here (release) and gathers them, with scripts/gpu-run.sh and scripts/gpu-cli-check.sh, in gpu-bin/ (git-ignored), for
# the device machine, which has no Rust:
#
#   scripts/gpu-build.sh            # then, on the device (run tool, carry: ["gpu-bin"]):  bash gpu-bin/gpu-run.sh
#
# The binaries embed the sm_90a cubins and load libcuda dynamically, so they need nothing else there.
#
# GPU_BIN=DIR gathers them in DIR instead. GPU_VARIANTS="name:FLAGS;name:FLAGS" also compiles
# kernels/splitkv_mla.cu once per entry with the extra nvcc FLAGS (e.g. -DMLA_FP8_QK_CHAIN_STEPS=18) into
# DIR/variants/name.cubin, for gpu-run.sh's `ab` step. MLA_NVCC (else scripts/install-cuda.sh's toolchain) is the
# compiler.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-hopper}"
BIN="${GPU_BIN:-gpu-bin}"
if [[ -z "${MLA_NVCC:-}" ]]; then
  scripts/install-cuda.sh >/dev/null
  export MLA_NVCC="$ROOT/.cuda/nvidia/cu13/bin/nvcc"
fi

cargo build --release -p mla-cli --bin flashmla
cargo build --release -p flashmla --example cuda_decode
# The executable of integration test $2 of package $1.
test_exe() {
  cargo test --release -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2"
}
TEST_EXE="$(test_exe mla-hopper gpu)"
CONFORMANCE_EXE="$(test_exe mla-integration conformance)"
[[ -x "$TEST_EXE" && -x "$CONFORMANCE_EXE" ]] || { echo "gpu-build: test binary not found" >&2; exit 1; }

mkdir -p "$BIN"
rm -f "$BIN/hopper-bench" # the former bench example, now `flashmla bench --backend hopper`
cp "$TEST_EXE" "$BIN/hopper-gpu-tests"
cp "$CONFORMANCE_EXE" "$BIN/conformance-tests"
cp "$CARGO_TARGET_DIR/release/flashmla" "$BIN/flashmla"
cp "$CARGO_TARGET_DIR/release/examples/cuda_decode" "$BIN/cuda_decode"
cp scripts/gpu-run.sh scripts/gpu-cli-check.sh "$BIN/"
strip --strip-debug "$BIN/hopper-gpu-tests" "$BIN/conformance-tests" "$BIN/flashmla" "$BIN/cuda_decode" 2>/dev/null || true

rm -rf "$BIN/variants"
if [[ -n "${GPU_VARIANTS:-}" ]]; then
  mkdir -p "$BIN/variants"
  IFS=';' read -ra entries <<<"$GPU_VARIANTS"
  pids=()
  for entry in "${entries[@]}"; do
    name="${entry%%:*}"
    flags="${entry#*:}"
    # The flags of crates/mla-hopper/build.rs, plus the variant's.
    # shellcheck disable=SC2086
    "$MLA_NVCC" -gencode arch=compute_90a,code=sm_90a -cubin -O3 -std=c++17 -lineinfo -Xptxas=-warn-spills \
      -I kernels $flags -o "$BIN/variants/$name.cubin" kernels/splitkv_mla.cu &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
fi
ls -la "$BIN" "$BIN/variants" 2>/dev/null || true
