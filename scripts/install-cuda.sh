#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc + NVVM + headers) from PyPI wheels into <repo>/.cuda, so that
# crates/mla-hopper/build.rs can compile the sm_90a kernels on a machine without a CUDA toolkit (CI, CPU boxes).
#
#   scripts/install-cuda.sh            # idempotent: does nothing when the pinned versions are already there
#   FORCE=1 scripts/install-cuda.sh    # reinstall
#
# Needs python3 with pip and network access to PyPI. build.rs finds <repo>/.cuda on its own (see
# crates/mla-hopper/build.rs for the search order). The toolchain is git-ignored.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cuda"
PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
)
STAMP="$DEST/.flashmla-pins"
WANT="$(printf '%s\n' "${PINS[@]}")"

if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && [[ -x "$(find "$DEST" -path '*/bin/nvcc' -type f 2>/dev/null | head -n1)" ]]; then
  echo "install-cuda: pinned toolchain already in $DEST"
else
  PY="${PYTHON:-python3}"
  rm -rf "$DEST"
  mkdir -p "$DEST"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST" "${PINS[@]}"
  printf '%s\n' "${PINS[@]}" > "$STAMP"
fi

NVCC="$(find "$DEST" -path '*/bin/nvcc' -type f | head -n1)"
if [[ -z "$NVCC" ]]; then
  echo "install-cuda: nvcc not found under $DEST after install" >&2
  exit 1
fi
chmod +x "$NVCC" "$(dirname "$NVCC")"/* 2>/dev/null || true
find "$DEST" -path '*nvvm/bin/*' -type f -exec chmod +x {} + 2>/dev/null || true
"$NVCC" --version | tail -n 2
echo "install-cuda: nvcc at $NVCC"
