//! Unit tests of the options, the grid, the formulas and the JSON (no device).

use mla_core::{DType, MlaBackend};

use super::grid::{Grid, costs, flops_bytes, small_configs, upstream_lengths};
use super::measure::Measured;
use super::report::{self, Row, write_json};
use super::{Options, parse};
use crate::anchors::{AnchorSet, Which};

/// Parses `flashmla bench --backend hopper <s>`; clap's errors and parse's alike as one line.
fn opts(s: &[&str]) -> Result<Options, String> {
    use clap::Parser;
    let argv = ["flashmla", "bench", "--backend", "hopper"].into_iter().chain(s.iter().copied());
    let cli = crate::args::Cli::try_parse_from(argv).map_err(|e| crate::args::one_line(&e))?;
    let crate::args::Command::Bench(b) = cli.command else { unreachable!("bench") };
    parse(&b).map_err(|e| e.to_string())
}

fn h100() -> AnchorSet {
    AnchorSet::load(Which::H100)
}

#[test]
fn defaults_are_upstreams_grid() {
    let o = opts(&[]).unwrap();
    assert_eq!(o.grid, Grid::Upstream);
    assert_eq!((o.batch, o.iters, o.sets), (128, 30, 2));
    assert_eq!(o.sks, [4096, 8192, 16384]);
    assert_eq!(o.hqs, [16, 32, 64, 128]);
    assert_eq!(o.sqs, [1, 2]);
    assert_eq!(o.modes, [false, true]);
    let a = h100();
    assert!(o.causal(DType::Bf16, &a) && o.causal(DType::F16, &a) && !o.causal(DType::E4M3, &a));
    let h200 = AnchorSet::load(Which::H200);
    assert!(o.causal(DType::E4M3, &h200), "upstream's FP8 figures on the H200 are causal");
    assert!(o.ceilings && !o.sync_each && !o.dry_run);
}

#[test]
fn flags_narrow_the_grid() {
    let o = opts(&["--dtypes", "e4m3", "--sk", "4096", "--hq", "16", "--sq", "1", "--varlen", "fixed"]).unwrap();
    assert_eq!(
        (o.dtypes, o.sks, o.hqs, o.sqs, o.modes),
        (vec![DType::E4M3], vec![4096], vec![16], vec![1], vec![false])
    );
    let o = opts(&["--dtype", "bf16,fp16", "--seqlen", "4096", "--h-q", "16,128", "--s-q", "1", "--varlen"]).unwrap();
    assert_eq!((o.dtypes.len(), o.sks, o.hqs, o.modes), (2, vec![4096], vec![16, 128], vec![true]));
    let o = opts(&["--varlen=varlen,fixed", "--no-causal", "--sync-each", "--iters", "3", "--sets", "1"]).unwrap();
    assert!(!o.causal(DType::Bf16, &h100()));
    assert_eq!((o.modes, o.iters, o.sets, o.sync_each), (vec![true, false], 3, 1, true));
    assert_eq!(opts(&["--grid", "small", "--dtype", "bf16"]).unwrap().grid, Grid::Small);
}

#[test]
fn bad_flags_are_one_line_errors() {
    let err = |s: &[&str]| opts(s).unwrap_err();
    assert!(err(&["--grid", "mem"]).contains("--grid"));
    assert!(err(&["--dtype", "bf16", "--dtypes", "e4m3"]).contains("not both"));
    assert!(err(&["--varlen", "sometimes"]).contains("--varlen"));
    assert!(err(&["--grid", "small", "--h-q", "16"]).contains("--h-q applies to --grid upstream"));
    assert!(err(&["--threads", "4"]).contains("--backend cpu only"));
    assert!(err(&["--min-time", "1"]).contains("--backend cpu only"));
    assert!(err(&["--iters", "0"]).contains(">= 1"));
    assert!(err(&["--hq", "0"]).contains(">= 1"));
    assert!(err(&["--typo"]).contains("--typo"));
    assert!(err(&["--anchors", "h300"]).contains("--anchors"));
}

#[test]
fn formulas_are_upstreams() {
    // bf16, b = 128, s_k = 4096, h_q = 16, s_q = 1: upstream's anchor row reports 80 TFLOPS and 2658 GB/s
    // at 0.229 ms.
    let (flops, bytes) = flops_bytes(DType::Bf16, 128 * 4096, 128, 1, 16);
    assert!((flops / 0.229e-3 / 1e12 - 80.0).abs() < 1.0, "{}", flops / 0.229e-3 / 1e12);
    assert!((bytes / 0.229e-3 / 1e9 - 2658.0).abs() < 5.0, "{}", bytes / 0.229e-3 / 1e9);
    let (_, bytes) = flops_bytes(DType::E4M3, 128 * 4096, 128, 1, 16);
    assert!((bytes / 0.129e-3 / 1e9 - 2371.0).abs() < 5.0, "{}", bytes / 0.129e-3 / 1e9);
}

#[test]
fn json_has_the_ceiling_the_device_the_anchors_and_one_object_per_row() {
    let be = mla_cpu::CpuBackend::new();
    let o = opts(&["--json", "x.json"]).unwrap();
    let row = |grid, seqlens: Option<Vec<i32>>, anchor_ms| Row {
        grid,
        dtype: DType::E4M3,
        batch: 128,
        h_q: 16,
        s_q: 1,
        s_k: Some(4096),
        mode: "fixed",
        seqlens,
        total_seqlen: 128 * 4096,
        causal: false,
        m: Measured { ms: 0.25, min_ms: 0.24, sched_ms: 0.004, host_us: 9.5, sched_host_us: 4.0, splits: 140 },
        tflops: 1.0,
        gbs: 1500.0,
        anchor_ms,
    };
    let rows = [row(Grid::Upstream, None, Some(0.129)), row(Grid::Small, Some(vec![4641, 45118]), None)];
    let path = std::env::temp_dir().join(format!("flashmla-bench-hopper-unit-{}.json", std::process::id()));
    write_json(&path, &be, Some(3000.0), &h100(), &o, &rows).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["ceilings"], serde_json::json!({"copy_gbs": 3000.0, "copy_bytes": 2147483648u64}));
    assert_eq!(j["device"], be.capabilities().device_name.as_str());
    assert_eq!(j["anchors"], "anchors-h100.json");
    let r = j["results"].as_array().unwrap();
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|r| r["dtype"] == "e4m3"));
    assert_eq!((r[0]["anchor_ms"].as_f64(), r[0]["ratio"].as_f64()), (Some(0.129), Some(0.516)));
    assert_eq!(r[0]["pct_copy_bw"].as_f64(), Some(50.0));
    assert_eq!(r[1]["seqlens"], serde_json::json!([4641, 45118]));
    assert!(r[1]["anchor_ms"].is_null() && r[1]["ratio"].is_null());
}

#[test]
fn progress_costs_follow_the_grid() {
    let o = opts(&["--dtype", "bf16", "--sk", "4096,8192", "--varlen", "fixed", "--h-q", "16", "--s-q", "1"]).unwrap();
    let c = costs(&o);
    assert_eq!(c.len(), 2);
    assert!((c[1] / c[0] - 2.0).abs() < 0.01, "{c:?}");
    assert_eq!(costs(&opts(&["--grid", "small"]).unwrap()).len(), 3 * 17);
}

#[test]
fn lengths_are_reproducible() {
    let a = upstream_lengths(128, 4096, true, 7);
    assert_eq!(a, upstream_lengths(128, 4096, true, 7));
    assert!(a.iter().all(|&s| s >= 2) && a.iter().any(|&s| s != 4096));
    assert_eq!(upstream_lengths(4, 8192, false, 7), vec![8192; 4]);
    assert_eq!(small_configs().len(), 17);
}

#[test]
fn result_lines_keep_their_columns() {
    // The lines the tables printed before they were declared as columns (same figures, same widths).
    let m = |ms, sched_ms| Measured { ms, min_ms: ms, sched_ms, host_us: 9.513, sched_host_us: 4.0, splits: 140 };
    let mut row = Row {
        grid: Grid::Upstream,
        dtype: DType::Bf16,
        batch: 128,
        h_q: 16,
        s_q: 1,
        s_k: Some(4096),
        mode: "varlen",
        seqlens: None,
        total_seqlen: 128 * 4096,
        causal: true,
        m: m(0.23456, 0.0041),
        tflops: 78.96,
        gbs: 2600.4,
        anchor_ms: Some(0.229),
    };
    let upstream = report::table(Grid::Upstream);
    assert_eq!(
        upstream.header(),
        "dtype    s_k  h_q s_q mode   cau        ms   TFLOPS     GB/s    anchor   ratio sched_us"
    );
    assert_eq!(row.line(), "bf16    4096   16   1 varlen   1    0.2346     79.0     2600     0.229   0.976      4.1");
    assert_eq!(row.label(), "bf16 s_k=4096 h_q=16 s_q=1");
    row.anchor_ms = None;
    assert_eq!(row.line(), "bf16    4096   16   1 varlen   1    0.2346     79.0     2600         -       -      4.1");
    let small = Row {
        grid: Grid::Small,
        dtype: DType::E4M3,
        batch: 4,
        h_q: 16,
        s_q: 4,
        s_k: None,
        mode: "list",
        seqlens: Some(vec![4641, 45118, 1730, 1696]),
        m: m(0.0345, 0.0042),
        gbs: 1234.5,
        ..row
    };
    assert_eq!(
        report::table(Grid::Small).header(),
        "dtype  b s_q  h_q lengths                      splits        us     GB/s sched_us  host_us sched_host"
    );
    assert_eq!(
        small.line(),
        "e4m3   4   4   16 [4641, 45118, 1730, 1696]       140      34.5     1234      4.2     9.51       4.00"
    );
    assert_eq!(small.label(), "e4m3 [4641, 45118, 1730, 1696]");
}

#[test]
fn patterns_are_the_former_per_element_encoding() {
    use mla_core::dtype::{f32_to_bf16, f32_to_e4m3, f32_to_f16};
    use mla_cpu::problem::Elems;

    use super::grid::Rng;
    use super::measure::random_pattern;

    // The bytes a seed gave before the patterns became `Elems` (bf16/fp16 bits, e4m3 codes of 8·x).
    for dtype in DType::ALL {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        let got = random_pattern(&mut a, dtype);
        let mut want = Vec::new();
        for _ in 0..got.len() {
            let x = b.normal() as f32;
            match dtype {
                DType::Bf16 => want.extend_from_slice(&f32_to_bf16(x).to_le_bytes()),
                DType::F16 => want.extend_from_slice(&f32_to_f16(x).to_le_bytes()),
                DType::E4M3 => want.push(f32_to_e4m3(x * 8.0)),
            }
        }
        let bytes: Vec<u8> = match got {
            Elems::U16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Elems::U8(v) => v,
        };
        assert_eq!(bytes.len(), 16 << 20, "{dtype:?}");
        assert!(bytes == want, "{dtype:?}");
        assert_eq!(a.normal(), b.normal(), "{dtype:?}: as many draws");
    }
}
