#!/usr/bin/env bash
# Builds the `flashmla` Python wheel (maturin, PyO3 stable ABI: flashmla-<version>-cp39-abi3-manylinux_*.whl, one
# wheel for every CPython >= 3.9 and every PyTorch): one command on a fresh machine with cargo and python3.
#
#   scripts/build-wheel.sh [OUT_DIR]        # default OUT_DIR: python/dist (git-ignored)
#
#   1. the pinned CUDA compiler into .cuda/ (scripts/install-cuda.sh), so the wheel carries the sm_90a kernels;
#      skipped with MLA_NO_KERNELS=1 (then the Hopper backend reports "kernels not built")
#   2. pip wheel ./python: pip fetches maturin for the isolated build, maturin runs cargo (release, stripped) on
#      crates/mla-python and checks the manylinux tag against the symbols the extension uses
#
# `pip install ./python` does the same build and installs it. Environment: PYTHON (default python3),
# CARGO_TARGET_DIR, MLA_NO_KERNELS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
OUT_DIR="${1:-$ROOT/python/dist}"
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac

if [[ "${MLA_NO_KERNELS:-0}" != 1 && -f scripts/install-cuda.sh ]]; then
    bash scripts/install-cuda.sh
fi

echo "== build-wheel: pip wheel ./python -> $OUT_DIR"
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/flashmla-*.whl
# maturin's PEP 517 backend tags wheels linux_x86_64 unless told the manylinux policy (pyproject's
# `compatibility` applies to `maturin build` only).
MATURIN_PEP517_ARGS="--compatibility manylinux_2_34" \
    "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$OUT_DIR" "$ROOT/python"
WHEEL="$(ls "$OUT_DIR"/flashmla-*.whl)"
case "$WHEEL" in
    *-cp39-abi3-manylinux_*_x86_64.whl) ;;
    *) echo "build-wheel: unexpected wheel tag: $WHEEL" >&2; exit 1 ;;
esac
echo "build-wheel: $WHEEL"
