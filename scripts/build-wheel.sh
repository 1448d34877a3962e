#!/usr/bin/env bash
# Builds the `flashmla` Python wheel (py3-none-<platform>): one command on a fresh machine with cargo and python3.
#
#   scripts/build-wheel.sh [OUT_DIR]        # default OUT_DIR: python/dist (git-ignored)
#
#   1. the pinned CUDA compiler into .cuda/ (scripts/install-cuda.sh), so the wheel carries the sm_90a kernels;
#      skipped with MLA_NO_KERNELS=1 (a CPU-only library: the Hopper backend then reports "kernels not built")
#   2. cargo build --release -p mla-ffi            -> $CARGO_TARGET_DIR/release/libflashmla.so (default target/)
#   3. python/ and libflashmla.so staged under $CARGO_TARGET_DIR/python-wheel/ (the source tree stays clean)
#   4. python3 -m pip wheel                        -> OUT_DIR/flashmla-<version>-py3-none-linux_x86_64.whl
#
# Environment: PYTHON (default python3), CARGO_TARGET_DIR, MLA_NO_KERNELS. pip fetches setuptools for the isolated
# build; set FLASHMLA_NO_BUILD_ISOLATION=1 to build offline with the setuptools (>= 70.1) already installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
OUT_DIR="${1:-$ROOT/python/dist}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac

if [[ "${MLA_NO_KERNELS:-0}" != 1 && -f scripts/install-cuda.sh ]]; then
    bash scripts/install-cuda.sh
fi

echo "== build-wheel: cargo build --release -p mla-ffi"
CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release -p mla-ffi
LIB="$TARGET_DIR/release/libflashmla.so"
[[ -f "$LIB" ]] || { echo "build-wheel: $LIB was not built" >&2; exit 1; }

STAGE="$TARGET_DIR/python-wheel"
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -R python/pyproject.toml python/setup.py python/README.md python/flashmla "$STAGE/"
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -f "$STAGE/flashmla/libflashmla.so"
cp "$LIB" "$STAGE/flashmla/libflashmla.so"

echo "== build-wheel: pip wheel -> $OUT_DIR"
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/flashmla-*.whl
ISOLATION=()
if [[ "${FLASHMLA_NO_BUILD_ISOLATION:-0}" == 1 ]]; then ISOLATION=(--no-build-isolation); fi
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps "${ISOLATION[@]}" -w "$OUT_DIR" "$STAGE"
WHEEL="$(ls "$OUT_DIR"/flashmla-*.whl)"
case "$WHEEL" in
    *-py3-none-linux_*.whl) ;;
    *) echo "build-wheel: unexpected wheel tag: $WHEEL" >&2; exit 1 ;;
esac
echo "build-wheel: $WHEEL"
