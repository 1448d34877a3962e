#!/usr/bin/env bash
# Builds the Hopper GPU tests and the `flashmla` CLI (whose `bench --backend hopper` is the H100 benchmark) here
# (release) and gathers them in gpu-bin/ (git-ignored), for the device machine, which has no Rust:
#
#   scripts/gpu-build.sh            # then, on the device (run tool, carry: ["gpu-bin"]):  scripts/gpu-run.sh
#
# The binaries embed the sm_90a cubins and load libcuda dynamically, so they need nothing else there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-hopper}"
scripts/install-cuda.sh >/dev/null

cargo build --release -p mla-cli --bin flashmla
TEST_EXE="$(cargo test --release -p mla-hopper --test gpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')"
[[ -x "$TEST_EXE" ]] || { echo "gpu-build: test binary not found" >&2; exit 1; }

mkdir -p gpu-bin
rm -f gpu-bin/hopper-bench # the former bench example, now `flashmla bench --backend hopper`
cp "$TEST_EXE" gpu-bin/hopper-gpu-tests
cp "$CARGO_TARGET_DIR/release/flashmla" gpu-bin/flashmla
strip --strip-debug gpu-bin/hopper-gpu-tests gpu-bin/flashmla 2>/dev/null || true
ls -la gpu-bin
