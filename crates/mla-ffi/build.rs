//! With the `soname` feature (set by scripts/install-c-lib.sh), gives `libflashmla.so` the SONAME
//! `libflashmla.so.<ABI major>`, read from `FLASHMLA_ABI_VERSION` in src/api.rs, so an engine linked against one ABI
//! refuses a library of another at load time.
//!
//! Off by default: the in-tree C tests link `target/<profile>/libflashmla.so` directly, and a SONAME would make their
//! programs look for a `libflashmla.so.<ABI>` that only an install creates.

use std::env;
use std::path::PathBuf;

/// The line of src/api.rs that defines the ABI version (the header's `FLASHMLA_ABI_VERSION` is generated from it).
const ABI_CONST: &str = "pub const FLASHMLA_ABI_VERSION: u32 = ";

fn main() {
    let api = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR")).join("src/api.rs");
    println!("cargo::rerun-if-changed={}", api.display());
    if env::var_os("CARGO_FEATURE_SONAME").is_none() {
        return;
    }
    let text = std::fs::read_to_string(&api).unwrap_or_else(|e| panic!("{}: {e}", api.display()));
    let abi: u32 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(ABI_CONST))
        .and_then(|rest| rest.trim_end_matches(';').trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: no `{ABI_CONST}N;` line", api.display()));
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo::rustc-cdylib-link-arg=-Wl,-soname,libflashmla.so.{abi}");
    }
}
