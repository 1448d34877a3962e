//! The report: the tables' lines, the `--json` file, the `--plot` roofline.

use std::path::Path;

use mla_core::{DType, MlaBackend};
use serde::Serialize;

use super::Options;
use super::grid::Grid;
use super::measure::{COPY_BYTES, Measured};
use crate::anchors::AnchorSet;
use crate::args::CliResult;
use crate::plot::{self, Plot, Point};
use crate::report::{pct, round, save_json};

/// One row of the report.
pub struct Row {
    pub grid: Grid,
    pub dtype: DType,
    pub batch: usize,
    pub h_q: usize,
    pub s_q: usize,
    /// Upstream grid: the nominal s_k; small grid: the common length, if all are equal.
    pub s_k: Option<usize>,
    /// `fixed`, `varlen`, or (small grid) `list`.
    pub mode: &'static str,
    /// Small grid only: the lengths.
    pub seqlens: Option<Vec<i32>>,
    pub total_seqlen: usize,
    pub causal: bool,
    pub m: Measured,
    pub tflops: f64,
    pub gbs: f64,
    pub anchor_ms: Option<f64>,
}

/// The run as `--json` writes it.
#[derive(Serialize)]
pub struct RunJson<'a> {
    backend: &'a str,
    device: &'a str,
    sm_count: usize,
    kernels: &'a str,
    ceilings: Option<CeilJson>,
    /// The anchor file compared with (`anchors-h200.json`).
    anchors: &'a str,
    grid: &'static str,
    iters: usize,
    sets: usize,
    timing: &'static str,
    seed: u64,
    results: Vec<RowJson<'a>>,
}

#[derive(Serialize)]
pub struct CeilJson {
    copy_gbs: f64,
    copy_bytes: usize,
}

#[derive(Serialize)]
pub struct RowJson<'a> {
    grid: &'static str,
    dtype: &'static str,
    batch: usize,
    h_q: usize,
    h_kv: usize,
    s_q: usize,
    s_k: Option<usize>,
    mode: &'static str,
    seqlens: Option<&'a [i32]>,
    total_seqlen: usize,
    causal: bool,
    splits: usize,
    ms: f64,
    min_ms: f64,
    sched_us: f64,
    host_us: f64,
    sched_host_us: f64,
    tflops: f64,
    gbs: f64,
    pct_copy_bw: Option<f64>,
    anchor_ms: Option<f64>,
    ratio: Option<f64>,
}

pub fn grid_name(g: Grid) -> &'static str {
    if g == Grid::Small { "small" } else { "upstream" }
}

/// The whole run as JSON: device, ceiling, anchors, options, one object per row.
pub fn write_json(
    path: &Path,
    be: &dyn MlaBackend,
    copy_gbs: Option<f64>,
    anchors: &AnchorSet,
    opts: &Options,
    rows: &[Row],
) -> CliResult {
    let caps = be.capabilities();
    let run = RunJson {
        backend: be.name(),
        device: &caps.device_name,
        sm_count: caps.sm_count,
        kernels: mla_hopper::build_info(),
        ceilings: copy_gbs.map(|c| CeilJson { copy_gbs: round(c, 1), copy_bytes: COPY_BYTES }),
        anchors: anchors.file,
        grid: grid_name(opts.grid),
        iters: opts.iters,
        sets: opts.sets,
        timing: if opts.sync_each { "sync-each" } else { "queued" },
        seed: opts.seed,
        results: rows
            .iter()
            .map(|r| RowJson {
                grid: grid_name(r.grid),
                dtype: r.dtype.name(),
                batch: r.batch,
                h_q: r.h_q,
                h_kv: 1,
                s_q: r.s_q,
                s_k: r.s_k,
                mode: r.mode,
                seqlens: r.seqlens.as_deref(),
                total_seqlen: r.total_seqlen,
                causal: r.causal,
                splits: r.m.splits,
                ms: round(r.m.ms, 5),
                min_ms: round(r.m.min_ms, 5),
                sched_us: round(r.m.sched_ms * 1e3, 2),
                host_us: round(r.m.host_us, 2),
                sched_host_us: round(r.m.sched_host_us, 2),
                tflops: round(r.tflops, 2),
                gbs: round(r.gbs, 1),
                pct_copy_bw: pct(r.gbs, copy_gbs),
                anchor_ms: r.anchor_ms,
                ratio: r.anchor_ms.map(|a| round(a / r.m.ms, 4)),
            })
            .collect(),
    };
    save_json(path, &run)
}

/// The rows as a roofline: TFLOPS and GB/s against the copy ceiling and upstream's figures.
pub fn draw_plot(path: &Path, device: &str, copy_gbs: Option<f64>, anchors: &AnchorSet, rows: &[Row]) -> CliResult {
    let plot = Plot {
        title: format!("flashmla bench, hopper on {device}"),
        copy_gbs,
        peak_gflops: None,
        anchor_label: plot::anchor_label(Some(anchors.file)),
        points: rows
            .iter()
            .map(|r| Point {
                dtype: r.dtype.name().into(),
                gflops: r.tflops * 1e3,
                gbs: r.gbs,
                anchor_gflops: r.anchor_ms.map(|a| r.tflops * 1e3 * r.m.ms / a),
            })
            .collect(),
    };
    plot::draw(&plot, path)?;
    println!("wrote {}", path.display());
    Ok(())
}

pub fn upstream_header() {
    println!(
        "{:<5} {:>6} {:>4} {:>3} {:<6} {:>3} {:>9} {:>8} {:>8} {:>9} {:>7} {:>8}",
        "dtype", "s_k", "h_q", "s_q", "mode", "cau", "ms", "TFLOPS", "GB/s", "anchor", "ratio", "sched_us"
    );
}

pub fn small_header() {
    println!(
        "{:<5} {:>2} {:>3} {:>4} {:<28} {:>6} {:>9} {:>8} {:>8} {:>8} {:>10}",
        "dtype", "b", "s_q", "h_q", "lengths", "splits", "us", "GB/s", "sched_us", "host_us", "sched_host"
    );
}

pub fn lengths_label(seqlens: &[i32]) -> String {
    if seqlens.iter().all(|&s| s == seqlens[0]) {
        format!("{} x {}", seqlens.len(), seqlens[0])
    } else {
        format!("{seqlens:?}")
    }
}
