//! The binary over FP8 caches (docs/sparse-fp8.md): `decode --fp8-cache` on the docs' worked example (bytes
//! written by hand, answers known) and on random problems against the CPU library called directly, `demo --mode
//! sparse` with its `--save` → `decode` round trip, `bench --grid sparse`, and one-line errors naming the option.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

use mla_core::dtype::bf16_to_f32;
use mla_core::{Fp8Cache, Fp8Layout};
use mla_cpu::CpuBackend;
use mla_cpu::fp8problem::{ExtraSpec, Fp8HostMode, Fp8HostProblem, Fp8HostRun, Fp8RandomSpec, SparseSpec};

/// This file's scratch directories.
fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("fp8", name)
}

const DV: usize = 512;

fn write_i64(path: &Path, shape: &[usize], v: &[i64]) {
    write_npy(path, "<i8", shape, &bytes_of(v, i64::to_le_bytes));
}

/// A cache as the C-ordered `[num_blocks, page_size, 1, bytes_per_token]` uint8 array: each block's bytes without
/// the stride's padding.
fn write_cache(path: &Path, c: &Fp8Cache) {
    let len = c.page_size * c.layout.bytes_per_token();
    let packed: Vec<u8> = c.bytes.chunks(c.block_stride).flat_map(|b| &b[..len]).copied().collect();
    write_npy(path, "|u1", &c.shape(), &packed);
}

/// The worked example of docs/sparse-fp8.md: a V3.2 cache of 2 pages of 2 tokens, token `n`'s NoPE columns all
/// `[1.0, 0.5, −1.0, 2.0][n]` (E4M3 code 256 or −256 times a power-of-two float32 scale), RoPE 0; one query of
/// `2^-9` on every NoPE column, so that with softmax scale 1 token `n` scores exactly its value.
fn worked_example(dir: &Path) {
    // (code, scale) per token: 0x78 is E4M3 256, 0xF8 is −256.
    let tokens: [(u8, f32); 4] = [(0x78, 1.0 / 256.0), (0x78, 1.0 / 512.0), (0xF8, 1.0 / 256.0), (0x78, 1.0 / 128.0)];
    let mut cache = Vec::new();
    for (code, scale) in tokens {
        cache.extend(std::iter::repeat_n(code, 512));
        for _ in 0..4 {
            cache.extend(scale.to_le_bytes());
        }
        cache.extend([0u8; 128]);
    }
    assert_eq!(cache.len(), 4 * 656);
    write_npy(&dir.join("kv.npy"), "|u1", &[2, 2, 1, 656], &cache);
    let q: Vec<f32> = (0..576).map(|c| if c < 512 { 1.0 / 512.0 } else { 0.0 }).collect();
    write_f32(&dir.join("q.npy"), &[1, 1, 1, 576], &q);
    // int64, as NumPy's default integers: range-checked into int32.
    write_i64(&dir.join("indices.npy"), &[1, 1, 4], &[0, 2, -1, 5]);
    write_f32(&dir.join("sink.npy"), &[1], &[0.0]);
    write_i32(&dir.join("bt.npy"), &[1, 2], &[0, 1]);
    write_i32(&dir.join("sl.npy"), &[1], &[3]);
}

fn fp8_decode(dir: &Path) -> Command {
    let mut c = bin();
    c.args(["decode", "--backend", "cpu", "--fp8-cache", "--softmax-scale", "1"]);
    c.arg("--q").arg(dir.join("q.npy")).arg("--kv-cache").arg(dir.join("kv.npy"));
    c.arg("--out").arg(dir.join("out.npy")).arg("--lse").arg(dir.join("lse.npy"));
    c
}

/// Runs `cmd` and returns every output value and the lse of the one query row.
fn one_row(cmd: &mut Command, dir: &Path) -> (Vec<f32>, f32) {
    let o = run(cmd);
    assert!(o.status.success(), "{}", stderr(&o));
    let (oshape, out) = read_f32(&dir.join("out.npy"));
    let (lshape, lse) = read_f32(&dir.join("lse.npy"));
    assert_eq!((oshape, lshape), (vec![1, 1, 1, DV], vec![1, 1, 1]));
    (out, lse[0])
}

#[test]
fn decode_worked_example_has_the_documented_answers() {
    let dir = tmpdir("worked");
    worked_example(&dir);
    let e = std::f64::consts::E;
    // Sparse: tokens 0 and 2 (−1 and 5 >= 4 tokens skipped), scores 1 and −1.
    let (out, lse) = one_row(fp8_decode(&dir).arg("--indices").arg(dir.join("indices.npy")), &dir);
    assert!(out.iter().all(|&x| x == 0.76171875), "{:?}", &out[..4]);
    assert!((lse as f64 - (e + 1.0 / e).ln()).abs() < 1e-6, "{lse}");
    // A zero sink scales the output by 1 / (1 + exp(−lse)) and leaves lse.
    let (out, lse2) = one_row(
        fp8_decode(&dir).arg("--indices").arg(dir.join("indices.npy")).arg("--attn-sink").arg(dir.join("sink.npy")),
        &dir,
    );
    assert!(out.iter().all(|&x| x == 0.57421875), "{:?}", &out[..4]);
    assert_eq!(lse2, lse);
    // topk_length 1: token 0 only, so out = 1 and lse = 1.
    write_i32(&dir.join("tl.npy"), &[1], &[1]);
    let (out, lse) = one_row(
        fp8_decode(&dir).arg("--indices").arg(dir.join("indices.npy")).arg("--topk-length").arg(dir.join("tl.npy")),
        &dir,
    );
    assert!(out.iter().all(|&x| x == 1.0) && lse == 1.0, "{:?} {lse}", &out[..4]);
    // Dense over tokens 0, 1, 2.
    let (out, lse) = one_row(
        fp8_decode(&dir).arg("--block-table").arg(dir.join("bt.npy")).arg("--seqlens").arg(dir.join("sl.npy")),
        &dir,
    );
    assert!(out.iter().all(|&x| x == 0.671875), "{:?}", &out[..4]);
    assert!((lse as f64 - (e + e.sqrt() + 1.0 / e).ln()).abs() < 1e-6, "{lse}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes a host problem as `decode --fp8-cache` inputs (q as raw bf16 `'<V2'` or float32, indices int32 or
/// int64) and returns the decode command reading them.
fn write_problem(dir: &Path, p: &Fp8HostProblem, raw_q: bool, wide_indices: bool) -> Command {
    let d = p.layout.head_dim_k();
    let q_shape = [p.batch, p.s_q, p.h_q, d];
    if raw_q {
        write_npy(&dir.join("q.npy"), "<V2", &q_shape, &bytes_of(&p.q, u16::to_le_bytes));
    } else {
        write_f32(&dir.join("q.npy"), &q_shape, &p.q.iter().map(|&x| bf16_to_f32(x)).collect::<Vec<_>>());
    }
    let mut c = bin();
    c.args(["decode", "--backend", "cpu", "--fp8-cache", "--q"]).arg(dir.join("q.npy"));
    c.arg("--out").arg(dir.join("out.npy")).arg("--lse").arg(dir.join("lse.npy"));
    let ints = |name: &str, shape: &[usize], v: &[i32]| {
        let path = dir.join(name);
        if wide_indices {
            write_i64(&path, shape, &v.iter().map(|&x| x as i64).collect::<Vec<_>>());
        } else {
            write_i32(&path, shape, v);
        }
        path
    };
    match &p.mode {
        Fp8HostMode::Sparse { main, extra, attn_sink } => {
            write_cache(&dir.join("kv.npy"), &main.cache);
            c.arg("--kv-cache").arg(dir.join("kv.npy"));
            c.arg("--indices").arg(ints("indices.npy", &[p.batch, p.s_q, main.topk], &main.indices));
            if let Some(l) = &main.topk_length {
                c.arg("--topk-length").arg(ints("tl.npy", &[p.batch], l));
            }
            if let Some(e) = extra {
                write_cache(&dir.join("kv2.npy"), &e.cache);
                c.arg("--extra-k-cache").arg(dir.join("kv2.npy"));
                c.arg("--extra-indices").arg(ints("indices2.npy", &[p.batch, p.s_q, e.topk], &e.indices));
                if let Some(l) = &e.topk_length {
                    c.arg("--extra-topk-length").arg(ints("tl2.npy", &[p.batch], l));
                }
            }
            if let Some(s) = attn_sink {
                write_f32(&dir.join("sink.npy"), &[p.h_q], s);
                c.arg("--attn-sink").arg(dir.join("sink.npy"));
            }
        }
        Fp8HostMode::Dense { cache, block_table, max_blocks_per_seq, seqlens, causal } => {
            write_cache(&dir.join("kv.npy"), cache);
            c.arg("--kv-cache").arg(dir.join("kv.npy"));
            c.arg("--block-table").arg(ints("bt.npy", &[p.batch, *max_blocks_per_seq], block_table));
            c.arg("--seqlens").arg(ints("sl.npy", &[p.batch], seqlens));
            if *causal {
                c.arg("--causal");
            }
        }
    }
    c
}

#[test]
fn decode_matches_the_library_bitwise_on_random_problems() {
    let mut sp = SparseSpec::new(40);
    sp.topk_length = true;
    sp.attn_sink = true;
    sp.invalid = 0.1;
    sp.duplicates = 0.1;
    sp.empty_rows = 0.1;
    let with_extra = SparseSpec {
        extra: Some(ExtraSpec { topk: 16, page_size: 5, mean_seqlen: 30, topk_length: true }),
        ..sp.clone()
    };
    let cases = [
        (Fp8Layout::V32, Some(with_extra.clone()), true, false),
        (Fp8Layout::Model1, Some(with_extra), false, true),
        (Fp8Layout::Model1, Some(sp), true, true),
        (Fp8Layout::V32, None, false, false),
    ];
    let backend = CpuBackend::new();
    for (n, (layout, sparse, raw_q, wide)) in cases.into_iter().enumerate() {
        let dense = sparse.is_none();
        let spec = Fp8RandomSpec {
            layout,
            batch: 3,
            s_q: 2,
            h_q: 8,
            page_size: 16,
            mean_seqlen: 60,
            varlen: true,
            sparse,
            causal: true,
            seed: n as u64,
        };
        let p = Fp8HostProblem::random(&spec).unwrap();
        let mut lib = Fp8HostRun::new(&backend, &p).unwrap();
        lib.decode().unwrap();
        let want = lib.outputs();
        let dir = tmpdir(&format!("random{n}"));
        let o = run(&mut write_problem(&dir, &p, raw_q, wide));
        assert!(o.status.success(), "case {n}: {}", stderr(&o));
        assert!(stdout(&o).contains(if dense { "dense" } else { "sparse" }), "{}", stdout(&o));
        let (_, out) = read_f32(&dir.join("out.npy"));
        let (_, lse) = read_f32(&dir.join("lse.npy"));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&want.out), "case {n} ({layout}): out");
        assert_eq!(bits(&lse), bits(&want.lse), "case {n} ({layout}): lse");
        // Something was attended to, and something was not (the generator's all-invalid rows, +inf sinks).
        assert!(lse.iter().any(|l| l.is_finite()), "case {n}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn demo_sparse_passes_and_its_save_round_trips_through_decode() {
    for (layout, extra) in [("v32", "16"), ("model1", "0")] {
        let dir = tmpdir(&format!("demo-{layout}"));
        let o = run(bin()
            .args(["demo", "--mode", "sparse", "--backend", "cpu", "--layout", layout, "--extra-topk", extra])
            .args(["--batch", "3", "--seqlen", "150", "--topk", "64", "--h-q", "8", "--page-size", "16"])
            .args(["--iters", "1", "--save"])
            .arg(&dir));
        let text = stdout(&o);
        assert!(o.status.success() && text.contains("PASS"), "{text}\n{}", stderr(&o));
        assert!(text.contains("bitwise identical") && text.contains("vs float64"), "{text}");
        assert!(text.contains(&format!("FP8 {layout} cache")), "{text}");
        // The printed command, with the outputs sent elsewhere, reproduces the saved outputs bit for bit.
        let line = text.lines().find(|l| l.contains("reproduce with: flashmla decode")).unwrap();
        let words: Vec<&str> = line.split("flashmla decode ").nth(1).unwrap().split_whitespace().collect();
        let cut = words.iter().position(|w| *w == "--out").unwrap();
        if extra != "0" {
            assert!(words.contains(&"--extra-k-cache") && words.contains(&"--extra-topk-length"), "{line}");
        }
        let o = run(bin()
            .args(["decode", "--backend", "cpu"])
            .args(&words[..cut])
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
}

#[test]
fn demo_sparse_on_hopper_fails_with_one_line() {
    // Without a GPU the backend is unavailable; on one, it answers `Unsupported` (docs/sparse-fp8.md). Either way:
    // one line naming the backend, status 2, no panic.
    let o = run(bin().args(["demo", "--mode", "sparse", "--backend", "hopper", "--batch", "2", "--topk", "32"]));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains("backend `hopper`") && !e.contains("panicked"), "{e}");
    assert!(e.contains("unavailable") || e.contains("does not support"), "{e}");
}

#[test]
fn bench_sparse_grid_lists_and_runs() {
    let o = run(bin().args(["bench", "--grid", "sparse", "--dry-run"]));
    let text = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.starts_with("8 configurations"), "{text}");
    for layout in ["v32", "model1"] {
        for h_q in ["h_q=64 ", "h_q=128 "] {
            let n = text.lines().filter(|l| l.contains(layout) && l.contains(h_q) && l.contains("topk=2048")).count();
            assert_eq!(n, 2, "{layout} {h_q}: {text}");
        }
    }
    let dir = tmpdir("bench");
    let json = dir.join("b.json");
    let o = run(bin()
        .args(["bench", "--grid", "sparse", "--batch", "2", "--seqlen", "100", "--topk", "32", "--h-q", "64"])
        .args(["--s-q", "1", "--iters", "1", "--min-time", "0", "--no-ceilings", "--json"])
        .arg(&json));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("[2/2] sparse model1 h_q=64 s_q=1"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (r, layout) in rows.iter().zip(["v32", "model1"]) {
        assert_eq!(
            (r["grid"].as_str(), r["dtype"].as_str(), r["topk"].as_u64()),
            (Some("sparse"), Some(layout), Some(32))
        );
        // Every selection is full (contexts of 100 tokens hold 32 distinct ones): 2 requests × 32 rows.
        assert_eq!(r["total_seqlen"].as_u64(), Some(64), "{r}");
        assert!(r["gbs"].as_f64().unwrap() > 0.0 && r["median_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    std::fs::remove_dir_all(&dir).ok();
    // Options of the other grid, by name.
    for (args, needle) in [
        (&["bench", "--topk", "8"][..], "--topk applies to --grid sparse only"),
        (&["bench", "--grid", "sparse", "--dtype", "bf16"][..], "--dtype applies to the dense grids"),
    ] {
        let o = run(bin().args(args));
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    }
}

#[test]
fn bad_fp8_inputs_give_one_line_errors_naming_the_option() {
    let dir = tmpdir("errors");
    let d = &dir;
    worked_example(d);
    let check = |cmd: &mut Command, needles: &[&str]| {
        let o = run(cmd);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(!e.contains("panicked"), "{e}");
        for n in needles {
            assert!(e.contains(n), "stderr `{e}` should contain `{n}`");
        }
    };
    let sparse = |extra: &[(&str, &str)]| {
        let mut c = fp8_decode(d);
        c.arg("--indices").arg(d.join("indices.npy"));
        for (flag, file) in extra {
            c.arg(flag).arg(d.join(file));
        }
        c
    };
    // Indices past int32's range (int64 files are range-checked), in the main and the extra selection.
    write_i64(&d.join("big.npy"), &[1, 1, 2], &[0, 1 << 31]);
    check(fp8_decode(d).arg("--indices").arg(d.join("big.npy")), &["--indices", "big.npy", "outside int32's range"]);
    check(
        &mut sparse(&[("--extra-k-cache", "kv.npy"), ("--extra-indices", "big.npy")]),
        &["--extra-indices", "element 1 is 2147483648"],
    );
    // Wrong dtypes.
    check(&mut sparse(&[("--attn-sink", "sl.npy")]), &["--attn-sink", "sl.npy", "'<i4'"]);
    check(fp8_decode(d).arg("--indices").arg(d.join("sink.npy")), &["--indices", "expected an int32 or int64 array"]);
    check(&mut sparse(&[("--topk-length", "sink.npy")]), &["--topk-length", "'<f4'"]);
    check(
        fp8_decode(d).arg("--indices").arg(d.join("indices.npy")).arg("--kv-cache").arg(d.join("q.npy")),
        &["--kv-cache", "expected the cache's bytes"],
    );
    // Shapes.
    write_i32(&d.join("idx2.npy"), &[2, 1, 4], &[0; 8]);
    check(fp8_decode(d).arg("--indices").arg(d.join("idx2.npy")), &["--indices", "expected shape [1, 1, topk]"]);
    write_f32(&d.join("sink2.npy"), &[2], &[0.0, 0.0]);
    check(&mut sparse(&[("--attn-sink", "sink2.npy")]), &["--attn-sink", "expected shape [1]"]);
    write_npy(&d.join("kv5.npy"), "|u1", &[1, 1, 1, 600], &[0; 600]);
    check(
        fp8_decode(d).arg("--indices").arg(d.join("indices.npy")).arg("--kv-cache").arg(d.join("kv5.npy")),
        &["--kv-cache", "656 (v32) or 584 (model1)"],
    );
    // A topk_length past topk: the library's check, naming the element.
    write_i32(&d.join("tl5.npy"), &[1], &[5]);
    check(&mut sparse(&[("--topk-length", "tl5.npy")]), &["topk_length[0]", "got 5"]);
    // Options that do not go together.
    check(sparse(&[]).arg("--causal"), &["--causal", "sparse"]);
    check(&mut sparse(&[("--block-table", "bt.npy")]), &["--block-table", "sparse"]);
    check(&mut sparse(&[("--extra-indices", "indices.npy")]), &["--extra-indices needs --extra-k-cache"]);
    check(&mut sparse(&[("--extra-k-cache", "kv.npy")]), &["--extra-k-cache needs --extra-indices"]);
    check(sparse(&[]).args(["--dtype", "fp16"]), &["--dtype", "bf16"]);
    check(sparse(&[]).args(["--descale-k", "2"]), &["--descale-k"]);
    check(
        fp8_decode(d)
            .arg("--block-table")
            .arg(d.join("bt.npy"))
            .arg("--seqlens")
            .arg(d.join("sl.npy"))
            .arg("--attn-sink")
            .arg(d.join("sink.npy")),
        &["--attn-sink", "give --indices"],
    );
    // The FP8 inputs without --fp8-cache: named, with the option that reads them.
    let mut plain = bin();
    plain.args(["decode", "--backend", "cpu", "--q"]).arg(d.join("q.npy")).arg("--kv-cache").arg(d.join("kv.npy"));
    plain.arg("--out").arg(d.join("o.npy")).arg("--lse").arg(d.join("l.npy"));
    check(
        Command::new(plain.get_program()).args(plain.get_args()).arg("--indices").arg(d.join("indices.npy")),
        &["--indices", "give --fp8-cache"],
    );
    check(
        plain.arg("--block-table").arg(d.join("bt.npy")).arg("--seqlens").arg(d.join("sl.npy")),
        &["--kv-cache", "looks like an FP8 cache", "--fp8-cache"],
    );
    std::fs::remove_dir_all(&dir).ok();
}
