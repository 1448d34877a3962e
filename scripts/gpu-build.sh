#!/usr/bin/env bash
# Builds the Hopper GPU test and bench binaries here (release) and gathers them in gpu-bin/ (git-ignored), for the
# device machine, which has no Rust:
#
#   scripts/gpu-build.sh            # then, on the device (run tool, carry: ["gpu-bin"]):  scripts/gpu-run.sh
#
# The binaries embed the sm_90a cubins and load libcuda dynamically, so they need nothing else there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-hopper}"
scripts/install-cuda.sh >/dev/null

cargo build --release -p mla-hopper --example bench
TEST_EXE="$(cargo test --release -p mla-hopper --test gpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')"
[[ -x "$TEST_EXE" ]] || { echo "gpu-build: test binary not found" >&2; exit 1; }

mkdir -p gpu-bin
cp "$TEST_EXE" gpu-bin/hopper-gpu-tests
cp "$CARGO_TARGET_DIR/release/examples/bench" gpu-bin/hopper-bench
strip --strip-debug gpu-bin/hopper-gpu-tests gpu-bin/hopper-bench 2>/dev/null || true
ls -la gpu-bin
