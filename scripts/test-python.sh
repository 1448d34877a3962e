#!/usr/bin/env bash
# Tests of the `flashmla` Python package (called by scripts/test.sh; runs on its own too).
#
#   1. a virtualenv under $CARGO_TARGET_DIR/python-test/ (default target/, git-ignored) with pinned numpy,
#      ml-dtypes and pytest (python3 -m venv; falls back to virtualenv where Debian lacks python3-venv); kept
#      between runs while the Python version and the pins are unchanged
#   2. the wheel, built by scripts/build-wheel.sh and pip-installed into that virtualenv; also installed alone into
#      a clean virtualenv (no NumPy, no torch) where it must import and open the CPU backend
#   3. pytest over python/tests against the *installed* wheel: the NumPy tests on the CPU backend always run;
#      the PyTorch/CUDA tests skip with a printed reason where torch or a GPU is missing
#      (FLASHMLA_REQUIRE_GPU=1 turns those skips into failures)
#
# Extra arguments go to pytest, e.g. scripts/test-python.sh -k readme -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
WORK="$TARGET_DIR/python-test"
VENV="$WORK/venv"
PINS=(numpy==2.2.6 ml-dtypes==0.5.1 pytest==8.3.5)
STAMP="$VENV/.flashmla-pins"
WANT="$("$PY" -c 'import sys; print(sys.version)') ${PINS[*]}"

# make_venv DIR: a virtualenv with pip. Debian's python3 without python3-venv has no ensurepip: then virtualenv
# is used, installed beside (not into) the system Python, so PEP 668 does not object.
make_venv() {
    rm -rf "$1"
    if "$PY" -m venv "$1" >/dev/null 2>&1; then
        return
    fi
    rm -rf "$1"
    if [[ ! -d "$WORK/virtualenv" ]]; then
        echo "test-python: python3 -m venv failed (no python3-venv?); using virtualenv"
        "$PY" -m pip install --quiet --disable-pip-version-check --target "$WORK/virtualenv" virtualenv==20.29.3
    fi
    PYTHONPATH="$WORK/virtualenv" "$PY" -m virtualenv --quiet "$1"
}

mkdir -p "$WORK"
if [[ ! -x "$VENV/bin/python" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
    echo "== test-python: virtualenv $VENV"
    make_venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
    echo "$WANT" > "$STAMP"
fi

WHEEL_DIR="$WORK/wheel"
PYTHON="$VENV/bin/python" bash scripts/build-wheel.sh "$WHEEL_DIR"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
    "$WHEEL_DIR"/flashmla-*.whl

echo "== test-python: the wheel alone in a clean virtualenv (no NumPy, no torch)"
CLEAN="$WORK/clean-venv"
make_venv "$CLEAN"
"$CLEAN/bin/python" -m pip install --quiet --disable-pip-version-check --no-index "$WHEEL_DIR"/flashmla-*.whl
(cd "$WORK" && "$CLEAN/bin/python" -c '
import sys, flashmla
assert "numpy" not in sys.modules and "torch" not in sys.modules
info = flashmla.backend_info("cpu")
print("clean install:", flashmla.__file__, "library", flashmla.library_version(), "cpu backend:", info["device_name"])
')

echo "== test-python: pytest"
# Run from outside python/ so that `import flashmla` finds the installed wheel, never the source tree; the tests
# check that (FLASHMLA_EXPECT_INSTALLED).
set +e
(cd "$WORK" && FLASHMLA_EXPECT_INSTALLED=1 FLASHMLA_REPO_ROOT="$ROOT" "$VENV/bin/pytest" -p no:cacheprovider -ra \
    "$ROOT/python/tests" "$@")
rc=$?
set -e
if [[ $rc == 5 ]]; then
    echo "test-python: pytest collected no tests" >&2
    exit 1
fi
exit $rc
