#!/usr/bin/env bash
# The installed C library as engines consume it: scripts/install-c-lib.sh into a temporary prefix, then the
# complete example of docs/c-api.md (CPU backend, get_mla_metadata + decode, checked against its closed-form answer)
# built twice and run: through pkg-config, and through CMake's find_package(flashmla) (tests/consumers/cmake).
# Each program must need libflashmla.so.<ABI> (the SONAME), found through the install's lib directory.
#
# cmake and pkg-config are installed with apt-get when missing and this runs as root; otherwise that consumer is
# skipped with the reason (FLASHMLA_REQUIRE_CONSUMERS=1 makes a skip a failure).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix

need() { # need TOOL PACKAGE: 0 if TOOL is there (installing PACKAGE with apt-get as root if not)
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing $2 (apt-get)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2") >/dev/null 2>&1 || true
    fi
    command -v "$1" >/dev/null 2>&1
}
skip() {
    echo "SKIPPED: $1"
    if [ "${FLASHMLA_REQUIRE_CONSUMERS:-0}" = 1 ]; then exit 1; fi
}

bash scripts/install-c-lib.sh --prefix "$prefix" --profile debug
abi=$(sed -n 's/^#define FLASHMLA_ABI_VERSION \([0-9][0-9]*\)$/\1/p' include/flashmla.h)
# The example: the first ```c block after the heading "## A complete example".
awk '/^## A complete example/ {s = 1} s && /^```c$/ {c = 1; next} c && /^```$/ {exit} c' docs/c-api.md > "$work/example.c"
[ -s "$work/example.c" ] || { echo "no C example found in docs/c-api.md" >&2; exit 1; }

check_needed() { # the program links the SONAME, not the unversioned name
    readelf -d "$1" | grep -q "NEEDED.*\[libflashmla.so.$abi\]" \
        || { echo "$1 does not need libflashmla.so.$abi:" >&2; readelf -d "$1" | grep NEEDED >&2; exit 1; }
}

passed=0
failed=0
if need pkg-config pkg-config; then
    echo "== pkg-config consumer"
    export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
    echo "pkg-config flashmla: version $(pkg-config --modversion flashmla), $(pkg-config --cflags --libs flashmla)"
    # shellcheck disable=SC2046 # pkg-config's output is a list of flags
    cc -std=c99 -Wall -Wextra -Werror -pedantic "$work/example.c" -o "$work/pc_consumer" \
        $(pkg-config --cflags --libs flashmla) -lm -Wl,-rpath,"$prefix/lib"
    check_needed "$work/pc_consumer"
    if "$work/pc_consumer"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
else
    skip "pkg-config consumer: pkg-config is not installed and could not be"
fi
if need cmake cmake; then
    echo "== CMake consumer (find_package(flashmla), target flashmla::flashmla)"
    cmake -S tests/consumers/cmake -B "$work/cmake-build" -DCMAKE_PREFIX_PATH="$prefix" \
        -DEXAMPLE_SOURCE="$work/example.c" >/dev/null
    cmake --build "$work/cmake-build" >/dev/null
    check_needed "$work/cmake-build/consumer"
    if "$work/cmake-build/consumer"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
else
    skip "CMake consumer: cmake is not installed and could not be"
fi
echo "consumers: $passed passed, $failed failed"
[ "$failed" = 0 ]
