#!/usr/bin/env bash
# Builds and installs the C library: what an engine's build needs to find and link libflashmla.
#
#   scripts/install-c-lib.sh [--prefix DIR] [--profile release|debug] [--no-cuda]
#   (debug: unoptimised crate, quicker to build: what the consumer tests use)
#
# Installs (default prefix /usr/local):
#   lib/libflashmla.so.<ABI>      SONAME libflashmla.so.<ABI>, the major of FLASHMLA_ABI_VERSION (feature `soname`)
#   lib/libflashmla.so            -> libflashmla.so.<ABI> (for -lflashmla)
#   lib/libflashmla.a
#   include/flashmla.h
#   lib/pkgconfig/flashmla.pc     pkg-config --cflags --libs flashmla
#   lib/cmake/flashmla/           find_package(flashmla) -> imported target flashmla::flashmla
#
# Why a script and not cargo-c (`cargo cinstall`), which produces the same files: cargo-c is built from source by
# `cargo install` (it links cargo itself, several hundred crates), many minutes on CI's fresh 2-core machine for
# every run, while this script only builds the crate the tests build anyway. The files are those cargo-c would
# install; switching later changes nothing for a consumer.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local
profile=release
features=(--features soname)
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --profile) profile=$2; shift 2 ;;
        --profile=*) profile=${1#--profile=}; shift ;;
        --no-cuda) features=(--no-default-features --features soname); shift ;;
        -h|--help) sed -n "2,19p" "$0"; exit 0 ;;
        *) echo "install-c-lib.sh: unknown argument '$1' (expected --prefix DIR, --profile release|debug, --no-cuda)" >&2; exit 2 ;;
    esac
done
# Profiles of their own (root Cargo.toml): the SONAME'd build must not overwrite target/{release,debug}/libflashmla.so.
case "$profile" in
    release) cargo_profile=(--profile c-lib); dir=c-lib ;;
    debug) cargo_profile=(--profile c-lib-dev); dir=c-lib-dev ;;
    *) echo "install-c-lib.sh: --profile: expected release or debug, got '$profile'" >&2; exit 2 ;;
esac

cd "$root"
cargo build -p mla-ffi "${cargo_profile[@]}" "${features[@]}"
target=${CARGO_TARGET_DIR:-$root/target}/$dir

abi=$(sed -n 's/^#define FLASHMLA_ABI_VERSION \([0-9][0-9]*\)$/\1/p' include/flashmla.h)
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
if [ -z "$abi" ] || [ -z "$version" ]; then
    echo "install-c-lib.sh: cannot read FLASHMLA_ABI_VERSION from include/flashmla.h or the version from Cargo.toml" >&2
    exit 1
fi
# What a static link of a Rust library needs from the system, as `rustc --print native-static-libs` lists it.
static_libs=$(cargo rustc -q -p mla-ffi "${cargo_profile[@]}" "${features[@]}" -- \
    --print native-static-libs 2>&1 | sed -n 's/.*native-static-libs: //p' | tail -1)

lib=$prefix/lib
install -d "$lib/pkgconfig" "$lib/cmake/flashmla" "$prefix/include"
install -m 755 "$target/libflashmla.so" "$lib/libflashmla.so.$abi"
ln -sfn "libflashmla.so.$abi" "$lib/libflashmla.so"
install -m 644 "$target/libflashmla.a" "$lib/libflashmla.a"
install -m 644 include/flashmla.h "$prefix/include/flashmla.h"
subst() {
    sed -e "s|@ABI@|$abi|g" -e "s|@VERSION@|$version|g" -e "s|@MAJOR@|${version%%.*}|g" \
        -e "s|@STATIC_LIBS@|$static_libs|g" "$1" > "$2"
}
subst crates/mla-ffi/cmake/flashmla.pc.in "$lib/pkgconfig/flashmla.pc"
subst crates/mla-ffi/cmake/flashmlaConfig.cmake.in "$lib/cmake/flashmla/flashmlaConfig.cmake"
subst crates/mla-ffi/cmake/flashmlaConfigVersion.cmake.in "$lib/cmake/flashmla/flashmlaConfigVersion.cmake"

soname=$(readelf -d "$lib/libflashmla.so.$abi" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
if [ "$soname" != "libflashmla.so.$abi" ]; then
    echo "install-c-lib.sh: $lib/libflashmla.so.$abi has SONAME '$soname', expected libflashmla.so.$abi" >&2
    exit 1
fi
echo "installed libflashmla $version (ABI $abi, SONAME $soname) into $prefix"
