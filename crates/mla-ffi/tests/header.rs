//! `include/flashmla.h` is generated from this crate by cbindgen and checked in; this test regenerates it in memory
//! and fails when the committed copy differs. `FLASHMLA_REGEN_HEADER=1` writes the new header instead.

mod common;

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate() -> String {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen failed on crates/mla-ffi");
    let mut buf = Vec::new();
    bindings.write(&mut buf);
    String::from_utf8(buf).expect("cbindgen wrote UTF-8")
}

#[test]
fn header_is_up_to_date() {
    let path: PathBuf = crate_dir().join("../../include/flashmla.h");
    let generated = generate();
    if std::env::var_os("FLASHMLA_REGEN_HEADER").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write include/flashmla.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let first_diff = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "include/flashmla.h is stale (first difference at line {}); regenerate it with \
             `FLASHMLA_REGEN_HEADER=1 cargo test -p mla-ffi --test header` and commit it",
            first_diff + 1
        );
    }
}

#[test]
fn header_declares_every_exported_function() {
    let header = std::fs::read_to_string(Path::new(&crate_dir()).join("../../include/flashmla.h")).unwrap();
    for f in common::ENTRY_POINTS {
        assert!(header.contains(&format!("{f}(")), "{f} missing from include/flashmla.h");
    }
    assert!(header.contains("#define FLASHMLA_ABI_VERSION 2"));
}
