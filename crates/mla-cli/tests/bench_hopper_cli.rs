//! `flashmla bench --backend hopper` without a GPU: the options parse (`--dry-run` lists the configurations and
//! their upstream anchors without opening a device), bad options are one-line errors, and the benchmark itself
//! fails with the backend's one-line reason and exit status 2. On a machine where the Hopper backend opens, the
//! no-GPU check is skipped (the other checks never touch the device).
// The GPU benchmark is built with the `cuda` feature only.
#![cfg(feature = "cuda")]

use std::process::{Command, Output};

fn flashmla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashmla")).args(args).output().expect("the binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether `flashmla info` reports a usable Hopper backend here.
fn hopper_here() -> bool {
    let o = flashmla(&["info"]);
    text(&o.stdout).lines().any(|l| l.trim_start().starts_with("hopper") && l.contains("available:"))
}

/// Runs `bench --backend hopper <args> --dry-run` and returns its configuration rows (lines before the summary).
fn dry_run(args: &[&str]) -> Vec<String> {
    let mut all = vec!["bench", "--backend", "hopper"];
    all.extend_from_slice(args);
    all.push("--dry-run");
    let o = flashmla(&all);
    assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let lines: Vec<String> = out.lines().map(str::to_string).collect();
    assert!(lines.last().is_some_and(|l| l.starts_with("dry run: ")), "{out}");
    assert!(lines[0].starts_with("anchors: anchors-h"), "{out}");
    lines[2..lines.len() - 1].to_vec()
}

#[test]
fn without_a_gpu_the_hopper_bench_is_a_one_line_error() {
    if hopper_here() {
        eprintln!("skipped: the Hopper backend is available here");
        return;
    }
    let json = std::env::temp_dir().join(format!("flashmla-bench-hopper-{}.json", std::process::id()));
    for args in [
        vec!["bench", "--backend", "hopper"],
        vec!["bench", "--backend", "hopper", "--grid", "small", "--dtype", "bf16", "--iters", "3", "--sets", "2"],
        vec!["bench", "--backend", "hopper", "--json", json.to_str().unwrap()],
    ] {
        let o = flashmla(&args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("flashmla bench: error: ") && err.contains("hopper"), "{err}");
        assert!(err.contains("unavailable") || err.contains("sm_90"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!json.exists(), "no JSON without a run");
    }
}

#[test]
fn the_grids_and_their_flags_parse() {
    // Upstream's grid: 3 dtypes × 3 s_k × {fixed, varlen} × 4 h_q × 2 s_q, with an anchor for every BF16/FP16 row
    // and every E4M3 row up to s_k = 8192.
    let rows = dry_run(&[]);
    assert_eq!(rows.len(), 144);
    assert_eq!(rows.iter().filter(|r| r.trim_end().ends_with('-')).count(), 16, "e4m3 at 16384 has no anchor");
    // issue 6's small batches: 17 shapes per dtype.
    assert_eq!(dry_run(&["--grid", "small"]).len(), 3 * 17);
    let small = dry_run(&["--grid", "small", "--dtype", "e4m3", "--iters", "5", "--sets", "3"]);
    assert_eq!(small.len(), 17);
    assert!(small[0].contains("[4641, 45118, 1730, 1696]") && small.iter().all(|r| r.starts_with("e4m3")));
    // The former example's flags narrow each list (one configuration: the ncu command of docs/gpu.md).
    let one = dry_run(&["--dtypes", "e4m3", "--sk", "4096", "--hq", "16", "--sq", "1", "--varlen", "fixed"]);
    assert_eq!(one.len(), 1);
    assert!(one[0].starts_with("e4m3") && one[0].contains("fixed") && one[0].trim_end().ends_with("0.129"), "{one:?}");
    // The CLI's own names, as scripts/gpu-cli-check.sh uses them.
    let cli = dry_run(&["--grid", "upstream", "--batch", "128", "--seqlen", "4096", "--h-q", "16,128", "--s-q", "1"]);
    let cli_bf16 = dry_run(&["--batch", "128", "--seqlen", "4096", "--h-q", "16,128", "--s-q", "1", "--dtype", "bf16"]);
    assert_eq!((cli.len(), cli_bf16.len()), (12, 4));
    assert!(cli_bf16.iter().all(|r| !r.trim_end().ends_with('-')), "{cli_bf16:?}");
    // `--varlen` alone: varlen lengths only; another batch has no anchor; --no-causal drops the BF16 anchors.
    let v = dry_run(&["--varlen", "--dtype", "bf16", "--sk", "8192"]);
    assert!(v.len() == 8 && v.iter().all(|r| r.contains("varlen")), "{v:?}");
    let b = dry_run(&["--batch", "64", "--dtype", "bf16", "--sk", "4096"]);
    assert!(b.iter().all(|r| r.trim_end().ends_with('-')), "{b:?}");
    let nc = dry_run(&["--no-causal", "--dtype", "bf16", "--sk", "4096", "--varlen=fixed,varlen", "--sync-each"]);
    assert!(nc.len() == 16 && nc.iter().all(|r| r.trim_end().ends_with('-')), "{nc:?}");
    // The H200's figures: every dtype causal (upstream's PR #122 FP8 too), FP16 and FP8 up to s_k = 16384.
    let h200 = dry_run(&["--anchors", "h200"]);
    assert_eq!(h200.len(), 144);
    assert!(h200.iter().all(|r| !r.trim_end().ends_with('-')), "{h200:?}");
    assert!(h200.iter().all(|r| r.split_whitespace().nth(5) == Some("1")), "all causal: {h200:?}");
    // The command lines of scripts/gpu-run.sh (steps bench and small) and of the ncu example in docs/gpu.md.
    dry_run(&["--json", "/tmp/unused.json"]);
    dry_run(&["--grid", "small", "--json", "/tmp/unused.json"]);
    dry_run(&["--dtypes", "e4m3", "--sk", "4096", "--hq", "16", "--sq", "1", "--varlen", "fixed", "--iters", "3"]);
}

#[test]
fn bad_hopper_bench_options_are_one_line_errors_before_any_device() {
    for (args, needle) in [
        (vec!["--grid", "mem"], "--grid"),
        (vec!["--grid", "small", "--h-q", "16"], "--h-q applies to --grid upstream only"),
        (vec!["--grid", "small", "--sk", "4096"], "--sk applies to --grid upstream only"),
        (vec!["--varlen", "often"], "--varlen"),
        (vec!["--dtype", "int8"], "int8"),
        (vec!["--dtype", "bf16", "--dtypes", "fp16"], "not both"),
        (vec!["--threads", "2"], "--backend cpu only"),
        (vec!["--sets", "0"], ">= 1"),
        (vec!["--hq", "x"], "--hq"),
        (vec!["--bogus", "1"], "unknown option --bogus"),
    ] {
        let mut all = vec!["bench", "--backend", "hopper"];
        all.extend_from_slice(&args);
        let o = flashmla(&all);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: `{err}` should contain `{needle}`");
    }
    // The CPU bench keeps its own flags: the hopper-only ones are refused there, by name.
    for flag in [&["--sets", "2"][..], &["--sync-each"], &["--sk", "4096"], &["--anchors", "h200"]] {
        let o = flashmla(&[&["bench", "--backend", "cpu"][..], flag].concat());
        assert_eq!(o.status.code(), Some(2));
        let want = format!("{} applies to --backend hopper only", flag[0]);
        assert!(text(&o.stderr).contains(&want), "{}", text(&o.stderr));
    }
}
