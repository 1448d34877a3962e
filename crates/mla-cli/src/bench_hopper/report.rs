//! The report: the tables' lines (of the run and of `--dry-run`), the `--json` file, the `--plot` roofline.

use std::path::Path;

use mla_core::{DType, MlaBackend};
use serde::Serialize;

use super::Options;
use super::grid::{Batch, Grid, flops_bytes};
use super::measure::{COPY_BYTES, Measured};
use crate::anchors::AnchorSet;
use crate::args::CliResult;
use crate::plot::{self, Plot, Point};
use crate::report::{Col, Table, or_dash, pct, round, save_json};

/// The upstream grid's results, against upstream's figures (`anchor`, ms; `ratio` = anchor / ms).
const UPSTREAM: Table = Table(&[
    Col::left("dtype", 5),
    Col::right("s_k", 6),
    Col::right("h_q", 4),
    Col::right("s_q", 3),
    Col::left("mode", 6),
    Col::right("cau", 3),
    Col::right("ms", 9),
    Col::right("TFLOPS", 8),
    Col::right("GB/s", 8),
    Col::right("anchor", 9),
    Col::right("ratio", 7),
    Col::right("sched_us", 8),
]);

/// The small batches' results, with the scheduler's cut (`splits`) and the host's µs per call.
const SMALL: Table = Table(&[
    Col::left("dtype", 5),
    Col::right("b", 2),
    Col::right("s_q", 3),
    Col::right("h_q", 4),
    Col::left("lengths", 28),
    Col::right("splits", 6),
    Col::right("us", 9),
    Col::right("GB/s", 8),
    Col::right("sched_us", 8),
    Col::right("host_us", 8),
    Col::right("sched_host", 10),
]);

/// `--dry-run` on the upstream grid: the configurations and upstream's figures.
const DRY_UPSTREAM: Table = Table(&[
    Col::left("dtype", 5),
    Col::right("s_k", 6),
    Col::right("h_q", 4),
    Col::right("s_q", 3),
    Col::left("mode", 6),
    Col::right("cau", 3),
    Col::right("b", 5),
    Col::right("anchor", 9),
]);

/// `--dry-run` on the small batches.
const DRY_SMALL: Table = Table(&[
    Col::left("dtype", 5),
    Col::right("b", 2),
    Col::right("s_q", 3),
    Col::right("h_q", 4),
    Col::left("lengths", 28),
    Col::right("cau", 3),
]);

/// The results table of `grid`.
pub fn table(grid: Grid) -> Table {
    match grid {
        Grid::Upstream => UPSTREAM,
        Grid::Small => SMALL,
    }
}

/// The `--dry-run` table of `grid`.
pub fn dry_run_table(grid: Grid) -> Table {
    match grid {
        Grid::Upstream => DRY_UPSTREAM,
        Grid::Small => DRY_SMALL,
    }
}

/// A configuration's line of `--dry-run`.
pub fn dry_run_line(batch: &Batch, dtype: DType, h_q: usize, s_q: usize, causal: bool, anchor: Option<f64>) -> String {
    let b = batch.seqlens.len();
    match batch.grid {
        Grid::Upstream => DRY_UPSTREAM.row(&[
            &dtype.name(),
            &or_dash(batch.s_k, 0),
            &h_q,
            &s_q,
            &batch.mode,
            &(causal as u8),
            &b,
            &or_dash(anchor, 3),
        ]),
        Grid::Small => DRY_SMALL.row(&[&dtype.name(), &b, &s_q, &h_q, &lengths_label(&batch.seqlens), &(causal as u8)]),
    }
}

/// `4 x 1024` for equal lengths, else the list.
fn lengths_label(seqlens: &[i32]) -> String {
    if seqlens.iter().all(|&s| s == seqlens[0]) {
        format!("{} x {}", seqlens.len(), seqlens[0])
    } else {
        format!("{seqlens:?}")
    }
}

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

impl Row {
    /// The row of `batch` at `h_q` and `s_q`, with upstream's formulas applied to the measured time.
    pub fn new(
        batch: &Batch,
        dtype: DType,
        (h_q, s_q): (usize, usize),
        causal: bool,
        m: Measured,
        anchor_ms: Option<f64>,
    ) -> Row {
        let b = batch.seqlens.len();
        let total_seqlen = batch.seqlens.iter().map(|&s| s.max(0) as usize).sum();
        let (flops, bytes) = flops_bytes(dtype, total_seqlen, b, s_q, h_q);
        Row {
            grid: batch.grid,
            dtype,
            batch: b,
            h_q,
            s_q,
            s_k: batch.s_k,
            mode: batch.mode,
            seqlens: (batch.grid == Grid::Small).then(|| batch.seqlens.clone()),
            total_seqlen,
            causal,
            tflops: flops / (m.ms * 1e-3) / 1e12,
            gbs: bytes / (m.ms * 1e-3) / 1e9,
            anchor_ms,
            m,
        }
    }

    /// The row's line of its grid's table.
    pub fn line(&self) -> String {
        let us = |ms: f64| ms * 1e3;
        match self.grid {
            Grid::Upstream => UPSTREAM.row(&[
                &self.dtype.name(),
                &or_dash(self.s_k, 0),
                &self.h_q,
                &self.s_q,
                &self.mode,
                &(self.causal as u8),
                &format!("{:.4}", self.m.ms),
                &format!("{:.1}", self.tflops),
                &format!("{:.0}", self.gbs),
                &or_dash(self.anchor_ms, 3),
                &or_dash(self.anchor_ms.map(|a| a / self.m.ms), 3),
                &format!("{:.1}", us(self.m.sched_ms)),
            ]),
            Grid::Small => SMALL.row(&[
                &self.dtype.name(),
                &self.batch,
                &self.s_q,
                &self.h_q,
                &lengths_label(self.seqlens.as_deref().unwrap_or_default()),
                &self.m.splits,
                &format!("{:.1}", us(self.m.ms)),
                &format!("{:.0}", self.gbs),
                &format!("{:.1}", us(self.m.sched_ms)),
                &format!("{:.2}", self.m.host_us),
                &format!("{:.2}", self.m.sched_host_us),
            ]),
        }
    }

    /// What the progress line names.
    pub fn label(&self) -> String {
        match &self.seqlens {
            Some(seqlens) => format!("{} {}", self.dtype.name(), lengths_label(seqlens)),
            None => format!("{} s_k={} h_q={} s_q={}", self.dtype.name(), or_dash(self.s_k, 0), self.h_q, self.s_q),
        }
    }
}

/// The run as `--json` writes it.
#[derive(Serialize)]
struct RunJson<'a> {
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
struct CeilJson {
    copy_gbs: f64,
    copy_bytes: usize,
}

#[derive(Serialize)]
struct RowJson<'a> {
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
        grid: opts.grid.name(),
        iters: opts.iters,
        sets: opts.sets,
        timing: if opts.sync_each { "sync-each" } else { "queued" },
        seed: opts.seed,
        results: rows
            .iter()
            .map(|r| RowJson {
                grid: r.grid.name(),
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
