//! `flashmla plan` and `flashmla info` driven as a user would: through the built binary.

use std::process::Command;

use mla_core::scheduler::{self, PartMetadata};

fn flashmla(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flashmla")).args(args).output().expect("run flashmla");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn plan_via_cli(seqlens: &[i32], extra: &[&str]) -> (usize, Vec<PartMetadata>, Vec<i32>) {
    let list = seqlens.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let mut args = vec!["plan", "--seqlens", &list, "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = flashmla(&args);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let p = j["num_sm_parts"].as_u64().unwrap() as usize;
    let rows = j["tile_scheduler_metadata"].as_array().unwrap();
    assert_eq!(rows.len(), p);
    let parts = rows
        .iter()
        .map(|r| {
            let w = r.as_array().unwrap();
            assert_eq!(w.len(), 8);
            PartMetadata::from_words(std::array::from_fn(|i| w[i].as_i64().unwrap() as i32))
        })
        .collect();
    let splits = j["num_splits"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
    (p, parts, splits)
}

#[test]
fn json_plan_matches_the_scheduler() {
    let (p, parts, splits) =
        plan_via_cli(&[1000, 64, 0, 3000, 130], &["--s-q", "1", "--h-q", "128", "--h-kv", "1", "--num-sms", "132"]);
    assert_eq!(p, 66);
    let want = scheduler::plan(&[1000, 64, 0, 3000, 130], 66).unwrap();
    assert_eq!(parts, want.parts);
    assert_eq!(splits, want.num_splits);
}

#[test]
fn json_plan_for_a_large_random_batch() {
    // b = 16384 with lengths up to 1e6: the CLI output must be the scheduler's plan, whose invariants the
    // mla-core property tests check.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let seqlens: Vec<i32> = (0..16384)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 1_000_001) as i32
        })
        .collect();
    let (p, parts, splits) = plan_via_cli(&seqlens, &["--h-q", "16", "--s-q", "2", "--h-kv", "1"]);
    let want = scheduler::plan(&seqlens, p).unwrap();
    assert_eq!(p, scheduler::num_sm_parts(132, 32, 1));
    assert_eq!(parts, want.parts);
    assert_eq!(splits, want.num_splits);
    assert_eq!(*splits.last().unwrap() as usize, want.total_splits());
}

#[test]
fn table_output_and_bad_arguments() {
    let (code, stdout, _) = flashmla(&["plan", "--seqlens", "1000,64,0,3000,130", "--num-sms", "8"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("num_splits: [0, 1, 2, 3, 6, 7]"), "{stdout}");
    for (args, needle) in [
        (vec!["plan", "--seqlens", "1,-5"], "cache_seqlens[1]"),
        (vec!["plan", "--seqlens", "1,x"], "--seqlens"),
        (vec!["plan", "--seqlens", "1", "--h-q", "3", "--h-kv", "2"], "--h-q"),
        (vec!["plan", "--seqlens", "1", "--num-sms", "0"], "--num-sms"),
        (vec!["plan"], "--seqlens"),
        (vec!["plan", "--seqlens-file", "/nonexistent.npy"], "/nonexistent.npy"),
        (vec!["plan", "--seqlens", "1", "--bogus", "2"], "--bogus"),
        (vec!["frobnicate"], "frobnicate"),
        (vec!["plna", "--seqlens", "1"], "did you mean `plan`?"),
        (vec!["plan", "--seqlens", "1", "--num-sm", "8"], "did you mean `--num-sms`?"),
        (vec!["plan", "--seqlens", "1", "--seqlens-file", "x.npy"], "exclusive"),
    ] {
        let (code, stdout, stderr) = flashmla(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(stdout.is_empty());
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"));
    }
}

#[test]
fn info_explains_missing_gpu() {
    let (code, stdout, stderr) = flashmla(&["info"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("cpu     available"), "{stdout}");
    // On a machine without a usable GPU the hopper line must say why.
    if !stdout.contains("hopper  available") {
        assert!(stdout.contains("hopper  unavailable: "), "{stdout}");
    }
}
