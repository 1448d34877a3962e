//! The conventions of a command-line tool, through the built binary: help for every command, `--version`,
//! suggestions for typos; `.npy` files as NumPy and ml_dtypes write them; progress on stderr; `--plot`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// This file's scratch directories.
fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("conv", name)
}

const COMMANDS: [&str; 5] = ["info", "plan", "decode", "demo", "bench"];
const D: usize = 576;
const DV: usize = 512;

#[test]
fn every_command_has_help_and_the_tool_a_version() {
    for cmd in COMMANDS {
        for flag in ["--help", "-h"] {
            let o = flashmla(&[cmd, flag]);
            let out = text(&o.stdout);
            assert!(o.status.success(), "{cmd} {flag}: {}", text(&o.stderr));
            assert!(out.contains(&format!("Usage: flashmla {cmd}")), "{cmd} {flag}: {out}");
        }
        let o = flashmla(&["help", cmd]);
        assert!(o.status.success() && text(&o.stdout).contains(&format!("Usage: flashmla {cmd}")));
    }
    // Each command's help names its own options.
    for (cmd, option) in
        [("plan", "--seqlens-file"), ("decode", "--kv-cache"), ("demo", "--check-rows"), ("bench", "--plot")]
    {
        assert!(text(&flashmla(&[cmd, "--help"]).stdout).contains(option), "{cmd} --help lacks {option}");
    }
    let top = flashmla(&["--help"]);
    assert!(top.status.success());
    for cmd in COMMANDS {
        assert!(text(&top.stdout).contains(cmd), "{}", text(&top.stdout));
    }
    for flag in ["--version", "-V"] {
        let o = flashmla(&[flag]);
        assert!(o.status.success());
        assert_eq!(text(&o.stdout).trim(), format!("flashmla {}", env!("CARGO_PKG_VERSION")));
    }
    // No command: the help on stderr, status 2 (as before clap).
    let o = flashmla(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("Usage: flashmla <COMMAND>") && o.stdout.is_empty());
}

#[test]
fn typos_get_a_one_line_suggestion() {
    for (args, want) in [
        (&["bnech"][..], "flashmla: error: unknown command `bnech` (did you mean `bench`?)"),
        (&["bench", "--itres", "3"], "flashmla bench: error: unknown option --itres (did you mean `--iters`?)"),
        (
            &["demo", "--backend", "cpuu"],
            "flashmla demo: error: --backend: expected one of auto, cpu, hopper, got `cpuu` (did you mean `cpu`?)",
        ),
        (&["bench", "--grid", "upstraem"], "did you mean `upstream`?"),
    ] {
        let o = flashmla(args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: `{err}` should contain `{want}`");
    }
}

/// b = 2 (lengths 2 and 1), s_q = 1, h_q = 1, page size 1, q = 0: each output row is the mean of its visible V
/// rows, exactly. Index arrays as int64 (NumPy's default integer), q and the cache as `q_descr`/`kv_descr`.
fn decode_numpy_files(dir: &Path, dtype: &str, q: (&str, Vec<u8>), kv: (&str, Vec<u8>)) -> Output {
    write_npy(&dir.join("q.npy"), q.0, &[2, 1, 1, D], &q.1);
    write_npy(&dir.join("kv.npy"), kv.0, &[3, 1, 1, D], &kv.1);
    write_npy(&dir.join("bt.npy"), "<i8", &[2, 2], &bytes_of(&[0i64, 2, 1, -1], i64::to_le_bytes));
    write_npy(&dir.join("sl.npy"), "<i8", &[2], &bytes_of(&[2i64, 1], i64::to_le_bytes));
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let args = ["decode", "--backend", "cpu", "--dtype", dtype, "--q", &p("q.npy"), "--kv-cache", &p("kv.npy")];
    let rest = ["--block-table", &p("bt.npy"), "--seqlens", &p("sl.npy"), "--out", &p("o.npy"), "--lse", &p("l.npy")];
    flashmla(&[&args[..], &rest].concat())
}

/// The first V column of the output rows (float32 `.npy` written by the binary, 128-byte header or less).
fn first_columns(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let data: Vec<f32> = b[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(data.len(), 2 * DV);
    vec![data[0], data[DV]]
}

#[test]
fn numpy_and_ml_dtypes_arrays_are_read() {
    let dir = tmpdir("npy");
    // Page p's first column is p + 1 (bf16 bits 0x3f80, 0x4000, 0x4040 = 1, 2, 3), the rest 0.
    let mut kv_bits = vec![0u16; 3 * D];
    for (p, bits) in [0x3f80u16, 0x4000, 0x4040].into_iter().enumerate() {
        kv_bits[p * D] = bits;
    }
    let q_bits = vec![0u16; 2 * D];
    // Request 0 sees pages 0 and 2 (mean of 1 and 3 = 2), request 1 page 1 (2).
    let o = decode_numpy_files(
        &dir,
        "bf16",
        ("<V2", bytes_of(&q_bits, u16::to_le_bytes)),
        ("<V2", bytes_of(&kv_bits, u16::to_le_bytes)),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(first_columns(&dir.join("o.npy")), vec![2.0, 2.0]);
    // float64 and float16 values, rounded to fp16.
    let kv64: Vec<f64> = (0..3 * D).map(|i| if i % D == 0 { (i / D + 1) as f64 } else { 0.0 }).collect();
    let q16 = vec![0u16; 2 * D]; // float16 zeros
    let o = decode_numpy_files(
        &dir,
        "fp16",
        ("<f2", bytes_of(&q16, u16::to_le_bytes)),
        ("<f8", bytes_of(&kv64, f64::to_le_bytes)),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(first_columns(&dir.join("o.npy")), vec![2.0, 2.0]);
    // Raw 2-byte elements with --dtype e4m3: refused, naming the file.
    let o = decode_numpy_files(
        &dir,
        "e4m3",
        ("<V2", bytes_of(&q_bits, u16::to_le_bytes)),
        ("<V2", bytes_of(&kv_bits, u16::to_le_bytes)),
    );
    let err = text(&o.stderr);
    assert!(o.status.code() == Some(2) && err.contains("q.npy") && err.contains("--dtype is e4m3"), "{err}");
    // An int64 index outside int32's range: the file and the value are named.
    write_npy(&dir.join("big.npy"), "<i8", &[2], &bytes_of(&[1i64, 1 << 40], i64::to_le_bytes));
    let o = flashmla(&["plan", "--seqlens-file", dir.join("big.npy").to_str().unwrap()]);
    let err = text(&o.stderr);
    assert!(err.contains("big.npy") && err.contains("1099511627776") && err.lines().count() == 1, "{err}");
    // int64 lengths, as np.array([100, 200]) saves them.
    write_npy(&dir.join("sl.npy"), "<i8", &[2], &bytes_of(&[100i64, 200], i64::to_le_bytes));
    let o = flashmla(&["plan", "--seqlens-file", dir.join("sl.npy").to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_shows_progress_on_stderr_and_plots() {
    let dir = tmpdir("plot");
    let (json, svg) = (dir.join("b.json"), dir.join("b.svg"));
    let o = flashmla(&[
        "bench",
        "--grid",
        "mem",
        "--dtype",
        "bf16",
        "--s-q",
        "1,2",
        "--batch",
        "2",
        "--seqlen",
        "70",
        "--iters",
        "1",
        "--min-time",
        "0",
        "--no-ceilings",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("[1/2] mem bf16") && err.contains("[2/2] mem bf16") && err.contains("left"), "{err}");
    assert!(!text(&o.stdout).contains("[1/2]"), "progress stays off stdout");
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("bf16: this run"), "{picture}");
    // The saved run plots again without running.
    let png = dir.join("again.png");
    let o = flashmla(&["bench", "--from-json", json.to_str().unwrap(), "--plot", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    let o = flashmla(&["bench", "--from-json", json.to_str().unwrap()]);
    assert!(text(&o.stderr).contains("--from-json needs --plot"), "{}", text(&o.stderr));
    std::fs::remove_dir_all(&dir).ok();
}
