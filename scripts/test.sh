#!/usr/bin/env bash
# The test command of flashmla-rs (README): installs what it needs, then runs every check CI runs.
#
#   1. the pinned CUDA compiler (pip wheels, project-local .cuda/) so the sm_90a kernels are compiled on every run
#   2. cargo fmt --check, clippy with warnings denied, cargo test over the whole workspace, rustdoc warnings denied
#   3. the installed C library as engines consume it (pkg-config and CMake), scripts/test-c-consumers.sh
#   4. the Python package's tests (pytest, in a project-local virtualenv), when the package is present
#
# GPU tests skip with a printed reason on machines without a GPU (set FLASHMLA_REQUIRE_GPU=1 to make them fail).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f scripts/install-cuda.sh ]; then
    bash scripts/install-cuda.sh
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

# cargo test hides what passing tests print, so say here whether the GPU tests ran or skipped, and why.
echo "== GPU backend on this machine"
info=$(cargo run -q -p mla-cli --bin flashmla -- info)
echo "$info" | grep -E "sm_90a kernels|hopper "
if ! grep -q "hopper  available" <<<"$info"; then
    echo "GPU tests (crates/mla-hopper/tests/gpu.rs, crates/mla-ffi/tests/gpu_abi.rs) skipped: no usable Hopper GPU" \
        "here (FLASHMLA_REQUIRE_GPU=1 makes that a failure; docs/gpu.md runs them on an H100)"
fi

echo "== C library install and consumers"
bash scripts/test-c-consumers.sh

if [ -f scripts/test-python.sh ]; then
    echo "== python tests"
    bash scripts/test-python.sh
fi
