//! The `flashmla` binary end to end: `decode` through `.npy` files on cases whose answers are known exactly, the
//! `demo --save` → `decode` round trip, `bench --json`, and the error messages for malformed inputs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// This file's scratch directories.
fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("cli", name)
}

const D: usize = 576;
const DV: usize = 512;

/// Files of a decode problem with b = 3 (lengths 2, 0, 1), s_q = 1, h_q = 2, h_kv = 1, page size 1:
/// q = 0 so every score is 0, making each output the plain average of the visible V rows.
struct Exact {
    dir: PathBuf,
    v: Vec<[f32; 3]>, // the first three V columns of pages 0..3
}

fn exact_case(name: &str, scale: f32) -> Exact {
    let dir = tmpdir(name);
    let q = vec![0f32; 3 * 2 * D];
    // Pages: request 0 uses pages 2 and 0, request 2 uses page 3; page 1 is NaN (never referenced).
    let mut kv = vec![f32::NAN; 4 * D];
    let mut v = Vec::new();
    for page in 0..4 {
        let vals = [page as f32 * scale, -0.5 * scale, 0.25 * (page as f32 + 1.0) * scale];
        v.push(vals);
        if page != 1 {
            for d in 0..D {
                kv[page * D + d] = if d < 3 { vals[d] } else { scale / 8.0 };
            }
        }
    }
    write_f32(&dir.join("q.npy"), &[3, 1, 2, D], &q);
    write_f32(&dir.join("kv.npy"), &[4, 1, 1, D], &kv);
    // Garbage (out of range, negative) past each request's last page must never be read.
    write_i32(&dir.join("bt.npy"), &[3, 3], &[2, 0, 99, -7, 123456, 5, 3, i32::MAX, -1]);
    write_i32(&dir.join("sl.npy"), &[3], &[2, 0, 1]);
    Exact { dir, v }
}

fn decode_cmd(dir: &Path) -> Command {
    let mut c = bin();
    c.arg("decode").arg("--backend").arg("cpu");
    for (flag, f) in [("--q", "q.npy"), ("--kv-cache", "kv.npy"), ("--block-table", "bt.npy"), ("--seqlens", "sl.npy")]
    {
        c.arg(flag).arg(dir.join(f));
    }
    c.arg("--out").arg(dir.join("out.npy")).arg("--lse").arg(dir.join("lse.npy"));
    c
}

#[test]
fn decode_known_answers_every_dtype() {
    for (dtype, scale, extra) in [
        ("bf16", 1.0, vec![]),
        ("fp16", 1.0, vec![]),
        // e4m3 stores x / descale: with descale_k = 1/16 the values below are exact codes.
        ("e4m3", 0.0625, vec!["--descale-q", "0.5", "--descale-k", "0.0625"]),
    ] {
        let ex = exact_case(dtype, scale);
        let o = run(decode_cmd(&ex.dir).args(["--dtype", dtype]).args(&extra));
        assert!(o.status.success(), "{dtype}: {}", stderr(&o));
        let (oshape, out) = read_f32(&ex.dir.join("out.npy"));
        let (lshape, lse) = read_f32(&ex.dir.join("lse.npy"));
        assert_eq!(oshape, vec![3, 1, 2, DV]);
        assert_eq!(lshape, vec![3, 2, 1]);
        for h in 0..2 {
            // Request 0: mean of pages 2 and 0; lse = ln 2 (two zero scores).
            let r0 = &out[h * DV..h * DV + 3];
            let want: Vec<f32> = (0..3).map(|d| (ex.v[2][d] + ex.v[0][d]) / 2.0).collect();
            assert_eq!(r0, &want[..], "{dtype} request 0 head {h}");
            assert_eq!(out[h * DV + 100], scale / 8.0);
            assert!((lse[h] - std::f32::consts::LN_2).abs() < 1e-6, "{dtype}: lse {}", lse[h]);
            // Request 1 has no tokens: out 0, lse +inf.
            assert!(out[(2 + h) * DV..(3 + h) * DV].iter().all(|&x| x == 0.0));
            assert_eq!(lse[2 + h], f32::INFINITY);
            // Request 2: exactly page 3; lse = 0.
            assert_eq!(&out[(4 + h) * DV..(4 + h) * DV + 3], &ex.v[3][..]);
            assert_eq!(lse[4 + h], 0.0);
        }
        std::fs::remove_dir_all(&ex.dir).ok();
    }
}

#[test]
fn demo_save_then_decode_round_trips_bitwise() {
    let dir = tmpdir("demo");
    let o = run(bin().args(["demo", "--backend", "cpu", "--batch", "3", "--seqlen", "150", "--h-q", "4"]).args([
        "--page-size",
        "16",
        "--dtype",
        "e4m3",
        "--iters",
        "1",
        "--save",
        dir.to_str().unwrap(),
    ]));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("PASS"), "{text}\n{}", stderr(&o));
    let o = run(bin()
        .args(["decode", "--backend", "cpu", "--dtype", "e4m3", "--causal", "--descale-q", "0.015625"])
        .args(["--descale-k", "0.0078125"])
        .arg("--q")
        .arg(dir.join("q.npy"))
        .arg("--kv-cache")
        .arg(dir.join("kv.npy"))
        .arg("--block-table")
        .arg(dir.join("block_table.npy"))
        .arg("--seqlens")
        .arg(dir.join("seqlens.npy"))
        .arg("--out")
        .arg(dir.join("out2.npy"))
        .arg("--lse")
        .arg(dir.join("lse2.npy")));
    assert!(o.status.success(), "{}", stderr(&o));
    for (a, b) in [("out.npy", "out2.npy"), ("lse.npy", "lse2.npy")] {
        assert_eq!(std::fs::read(dir.join(a)).unwrap(), std::fs::read(dir.join(b)).unwrap(), "{a} vs {b}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_writes_json() {
    let dir = tmpdir("bench");
    let json = dir.join("b.json");
    let o = run(bin()
        .args(["bench", "--grid", "mem", "--dtype", "bf16,e4m3", "--s-q", "2", "--batch", "2", "--seqlen", "70"])
        .args(["--iters", "1", "--min-time", "0", "--no-ceilings", "--json"])
        .arg(&json));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&json).unwrap();
    assert_eq!(text.matches("\"grid\": \"mem\"").count(), 2, "{text}");
    assert!(text.contains("\"dtype\": \"e4m3\"") && text.contains("\"ceilings\": null"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn error_messages_name_the_file_and_the_problem() {
    let ex = exact_case("errors", 1.0);
    let d = &ex.dir;
    let check = |cmd: &mut Command, needles: &[&str]| {
        let o = run(cmd);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        for n in needles {
            assert!(e.contains(n), "stderr `{e}` should contain `{n}`");
        }
        assert!(!e.contains("panicked"), "{e}");
    };
    // Not a .npy file.
    std::fs::write(d.join("junk.npy"), b"definitely not numpy").unwrap();
    check(decode_cmd(d).arg("--q").arg(d.join("junk.npy")), &["junk.npy", "not a readable .npy file"]);
    // Truncated data.
    write_npy(&d.join("short.npy"), "<f4", &[1, 1, 1, D], &[0u8; 8]);
    check(decode_cmd(d).arg("--q").arg(d.join("short.npy")), &["short.npy", "needs"]);
    // Wrong dtype and rank.
    check(decode_cmd(d).arg("--q").arg(d.join("sl.npy")), &["sl.npy", "got dtype '<i4'"]);
    write_f32(&d.join("q3.npy"), &[3, 2, D], &vec![0.0; 6 * D]);
    check(decode_cmd(d).arg("--q").arg(d.join("q3.npy")), &["q3.npy", "[b, s_q, h_q, 576]", "[3, 2, 576]"]);
    // Mismatched batch.
    write_i32(&d.join("sl2.npy"), &[2], &[1, 1]);
    check(decode_cmd(d).arg("--seqlens").arg(d.join("sl2.npy")), &["sl2.npy", "expected 3 lengths"]);
    // h_kv must divide h_q.
    write_f32(&d.join("kv3.npy"), &[4, 1, 3, D], &vec![0.0; 12 * D]);
    check(decode_cmd(d).arg("--kv-cache").arg(d.join("kv3.npy")), &["kv3.npy", "must divide h_q"]);
    // A page id that is read and out of range.
    write_i32(&d.join("bt2.npy"), &[3, 3], &[2, 4, 0, 0, 0, 0, 3, 0, 0]);
    check(decode_cmd(d).arg("--block-table").arg(d.join("bt2.npy")), &["block_table[0][1]", "got 4"]);
    // A length needing more pages than the table has.
    write_i32(&d.join("sl3.npy"), &[3], &[2, 0, 4]);
    check(decode_cmd(d).arg("--seqlens").arg(d.join("sl3.npy")), &["cache_seqlens[2]"]);
    // Options.
    check(decode_cmd(d).args(["--descale-q", "2"]), &["--descale-q", "e4m3 only"]);
    check(decode_cmd(d).args(["--dtype", "int8"]), &["--dtype", "int8"]);
    check(bin().args(["decode", "--q", "x.npy"]), &["--kv-cache", "are required"]);
    check(decode_cmd(d).args(["--backend", "tpu"]), &["backend", "tpu"]);
    check(decode_cmd(d).arg("--q").arg(d.join("missing.npy")), &["missing.npy", "cannot read"]);
    std::fs::remove_dir_all(d).ok();
}
