//! `flashmla bench`: upstream's benchmark grid, scaled to this machine, with upstream's formulas and this
//! machine's measured ceilings. `--backend hopper` runs upstream's full grid on the GPU instead
//! ([`crate::bench_hopper`]).
//!
//! | grid | configurations (per dtype) | why |
//! |---|---|---|
//! | `upstream` | h_kv = 1, h_q ∈ {16, 32, 64, 128}, s_q ∈ {1, 2}, b = 16, s_k = 4096 (upstream: b = 128) | the published grid; on a CPU every row is compute-bound (M = s_q·h_q ≥ 16 query rows share each K row) |
//! | `mem` | h_q = h_kv = 16 (M = s_q), s_q ∈ {1, 2}, b = 16, s_k = 256 | memory-bound rows, to compare against the copy bandwidth |
//! | `sparse` (per layout, V3.2 and MODEL1; not in `all`) | h_q ∈ {64, 128}, s_q ∈ {1, 2}, b = 16, topk = 2048 distinct tokens of s_k = 4096 | upstream's sparse decode shapes (docs/sparse-fp8.md), bf16 q over an FP8 cache |
//!
//! FLOPs = `2·s_q·Σs_k·h_q·(576+512)`; bytes = `elt·(Σs_k·h_kv·576 + b·s_q·h_q·576) + out_elt·b·s_q·h_q·512`.
//! Sparse rows: `Σs_k` is the selected token rows read, and bytes and FLOPs are [`crate::sparse::bytes`] /
//! [`crate::sparse::flops`] (the rows' bytes per token, bf16 q and out); the dtype column names the layout.
//! A row is memory-bound when FLOPs/bytes is below the measured ridge (FMA peak / copy bandwidth). The ceilings are
//! measured once up front (about a second) and again, briefly, before every row: on a shared machine the load
//! changes from one row to the next, and each row's percentages are against the ceilings measured next to it.

use std::path::Path;

use mla_core::{DType, Fp8Layout, HEAD_DIM_K, HEAD_DIM_V, MlaBackend};
use mla_cpu::fp8problem::{Fp8HostProblem, Fp8RandomSpec, SparseSpec};
use mla_cpu::problem::{HostProblem, RandomSpec};
use mla_cpu::roofline::{self, Ceilings};
use mla_cpu::{CpuBackend, CpuOptions};
use serde::Serialize;

use crate::args::{BenchArgs, CliResult};
use crate::plot::{self, Plot, Point};
use crate::progress::Progress;
use crate::report::{Col, Table, or_dash, pct, round, save_json};
use crate::{cli_err, exec, sparse};

/// Options of the GPU benchmark, rejected here by name.
const HOPPER_ONLY: [&str; 7] = ["sets", "sync-each", "anchors", "sk", "dtypes", "hq", "sq"];

/// Tokens per page of every generated cache (upstream's page size).
const PAGE_SIZE: usize = 64;
/// Sparse grid: selected tokens per query token (upstream's V3.2 `topk`).
const SPARSE_TOPK: usize = 2048;
/// Sparse grid: context length, above `topk` so that every selection is full.
const SPARSE_SEQLEN: usize = 4096;
/// Sparse grid: query heads (upstream's sparse decode runs h_q 64 and 128).
const SPARSE_H_Q: [usize; 2] = [64, 128];

/// A configuration's problem: the dense decode, or a sparse decode over an FP8 cache.
#[derive(Clone, Debug)]
enum Spec {
    Dense(RandomSpec),
    Sparse(Fp8RandomSpec),
}

/// One configuration of the grid.
#[derive(Clone, Debug)]
struct Config {
    grid: &'static str,
    spec: Spec,
}

/// The figures of a configuration the report prints, whichever its kind.
struct Shape {
    /// dtype (dense) or layout (sparse).
    dtype: &'static str,
    batch: usize,
    s_q: usize,
    h_q: usize,
    h_kv: usize,
    mean_seqlen: usize,
    varlen: bool,
    causal: bool,
    topk: Option<usize>,
}

impl Config {
    fn shape(&self) -> Shape {
        match &self.spec {
            Spec::Dense(s) => Shape {
                dtype: s.dtype.name(),
                batch: s.batch,
                s_q: s.s_q,
                h_q: s.h_q,
                h_kv: s.h_kv,
                mean_seqlen: s.mean_seqlen,
                varlen: s.varlen,
                causal: s.causal,
                topk: None,
            },
            Spec::Sparse(s) => Shape {
                dtype: s.layout.name(),
                batch: s.batch,
                s_q: s.s_q,
                h_q: s.h_q,
                h_kv: 1,
                mean_seqlen: s.mean_seqlen,
                varlen: s.varlen,
                causal: false,
                topk: s.sparse.as_ref().map(|sp| sp.topk),
            },
        }
    }
}

/// One timed configuration: its problem's size and traffic, and the timing.
struct Measured {
    /// Σs_k (dense) or the selected token rows read (sparse).
    tokens: u64,
    bytes: f64,
    flops: f64,
    timing: exec::Timing,
}

/// Builds a configuration's problem and times it on `backend`.
fn measure(backend: &dyn MlaBackend, spec: &Spec, min_iters: usize, min_time: f64) -> CliResult<Measured> {
    match spec {
        Spec::Dense(s) => {
            let p = HostProblem::random(s);
            let (_, timing) = exec::time_decode(backend, &p, min_iters, MAX_ITERS, min_time)?;
            Ok(Measured { tokens: p.total_seqlen(), bytes: p.bytes(), flops: p.flops(), timing })
        }
        Spec::Sparse(s) => {
            let p = Fp8HostProblem::random(s)?;
            let (_, timing) = exec::time_fp8(backend, &p, min_iters, MAX_ITERS, min_time)?;
            Ok(Measured { tokens: sparse::rows_read(&p), bytes: sparse::bytes(&p), flops: sparse::flops(&p), timing })
        }
    }
}

/// Most timed calls of one configuration.
const MAX_ITERS: usize = 1000;

/// The table of results; a last column, the bound, follows two spaces after it.
const TABLE: Table = Table(&[
    Col::left("grid", 9),
    Col::left("dtype", 6),
    Col::right("h_q", 5),
    Col::right("h_kv", 4),
    Col::right("s_q", 4),
    Col::right("b", 3),
    Col::right("Σs_k", 8),
    Col::right("ms", 10),
    Col::right("GB/s", 9),
    Col::right("GFLOP/s", 9),
    Col::right("copy", 6),
    Col::right("fma", 6),
    Col::right("%copy", 7),
    Col::right("%fma", 7),
]);

/// One measured configuration.
struct Row {
    cfg: Config,
    /// Ceilings re-measured just before this row (CPU backend).
    ceil: Option<Ceilings>,
    total_seqlen: u64,
    median_s: f64,
    best_s: f64,
    iters: usize,
    gbs: f64,
    gflops: f64,
}

/// FLOPs of a configuration at its mean length (upstream's formula, before the random lengths are drawn; sparse:
/// `min(topk, s_k)` tokens per query token).
fn nominal_flops(spec: &Spec) -> f64 {
    match spec {
        Spec::Dense(s) => 2.0 * (s.batch * s.mean_seqlen * s.s_q * s.h_q) as f64 * (HEAD_DIM_K + HEAD_DIM_V) as f64,
        Spec::Sparse(s) => {
            let topk = s.sparse.as_ref().map_or(s.mean_seqlen, |sp| sp.topk.min(s.mean_seqlen));
            2.0 * (s.batch * topk * s.s_q * s.h_q) as f64 * (s.layout.head_dim_k() + HEAD_DIM_V) as f64
        }
    }
}

/// The hopper-only options that were given.
fn hopper_only_given(a: &BenchArgs) -> Option<&'static str> {
    let given = [
        a.sets.is_some(),
        a.sync_each,
        a.anchors.is_some(),
        a.sk.is_some(),
        a.dtypes.is_some(),
        a.hq.is_some(),
        a.sq.is_some(),
    ];
    HOPPER_ONLY.iter().zip(given).find(|(_, g)| *g).map(|(n, _)| *n)
}

fn grid(args: &BenchArgs) -> CliResult<Vec<Config>> {
    let which = args.grid.as_deref().unwrap_or("all");
    let sparse_grid = which == "sparse";
    if !sparse_grid {
        if args.topk.is_some() {
            return Err(cli_err!("--topk applies to --grid sparse only"));
        }
        if args.layout.is_some() {
            return Err(cli_err!("--layout applies to --grid sparse only"));
        }
    } else if args.dtype.is_some() {
        return Err(cli_err!(
            "--dtype applies to the dense grids (--grid sparse: bf16 q over FP8 caches, see --layout)"
        ));
    }
    let dtypes: Vec<DType> = args.dtype.clone().unwrap_or_else(|| DType::ALL.to_vec());
    let default_h_q = if sparse_grid { SPARSE_H_Q.to_vec() } else { vec![16, 32, 64, 128] };
    let h_qs: Vec<usize> = args.h_q.clone().unwrap_or(default_h_q);
    let s_qs: Vec<usize> = args.s_q.clone().unwrap_or_else(|| vec![1, 2]);
    let batch: usize = args.batch.unwrap_or(16);
    let seqlen: Option<usize> = match args.seqlen.as_deref() {
        None => None,
        Some([one]) => Some(*one),
        Some(v) => return Err(cli_err!("--seqlen: expected one mean length with --backend cpu, got {v:?}")),
    };
    let varlen = match &args.varlen {
        Some(Some(_)) => {
            return Err(cli_err!("--varlen takes no value (a list of fixed,varlen is for --backend hopper)"));
        }
        Some(None) => true,
        None => false,
    };
    let causal = !args.no_causal;
    let seed: u64 = args.seed.unwrap_or(0);
    if !matches!(which, "all" | "upstream" | "mem" | "sparse") {
        return Err(cli_err!("--grid: expected all, upstream, mem or sparse with --backend cpu, got `{which}`"));
    }
    if batch == 0 || h_qs.contains(&0) || s_qs.contains(&0) || seqlen == Some(0) {
        return Err(cli_err!("--batch, --h-q, --s-q and --seqlen take values >= 1"));
    }
    if sparse_grid {
        let topk = args.topk.unwrap_or(SPARSE_TOPK);
        if topk == 0 {
            return Err(cli_err!("--topk: expected a value >= 1, got 0"));
        }
        let layouts = match &args.layout {
            Some(v) => v
                .iter()
                .map(|l| Fp8Layout::parse(l).ok_or_else(|| cli_err!("--layout: expected v32 or model1, got `{l}`")))
                .collect::<CliResult<Vec<_>>>()?,
            None => Fp8Layout::ALL.to_vec(),
        };
        let mut out = Vec::new();
        for &layout in &layouts {
            for &h_q in &h_qs {
                for &s_q in &s_qs {
                    let spec = Fp8RandomSpec {
                        layout,
                        batch,
                        s_q,
                        h_q,
                        page_size: PAGE_SIZE,
                        mean_seqlen: seqlen.unwrap_or(SPARSE_SEQLEN),
                        varlen,
                        sparse: Some(SparseSpec::new(topk)),
                        causal: false,
                        seed,
                    };
                    out.push(Config { grid: "sparse", spec: Spec::Sparse(spec) });
                }
            }
        }
        return Ok(out);
    }
    let spec = |dtype, h_q, h_kv, s_q, s_k| RandomSpec {
        batch,
        s_q,
        h_q,
        h_kv,
        mean_seqlen: seqlen.unwrap_or(s_k),
        varlen,
        page_size: PAGE_SIZE,
        dtype,
        causal,
        seed,
    };
    let mut out = Vec::new();
    for &dtype in &dtypes {
        if which != "mem" {
            for &h_q in &h_qs {
                for &s_q in &s_qs {
                    out.push(Config { grid: "upstream", spec: Spec::Dense(spec(dtype, h_q, 1, s_q, 4096)) });
                }
            }
        }
        if which != "upstream" {
            for &s_q in &s_qs {
                out.push(Config { grid: "mem", spec: Spec::Dense(spec(dtype, 16, 16, s_q, 256)) });
            }
        }
    }
    Ok(out)
}

/// The run as `--json` writes it.
#[derive(Serialize)]
struct RunJson<'a> {
    backend: &'a str,
    device: &'a str,
    ceilings: Option<CeilJson>,
    results: Vec<RowJson>,
}

#[derive(Serialize)]
struct CeilJson {
    copy_gbs: f64,
    fma_gflops: f64,
    threads: usize,
}

#[derive(Serialize)]
struct RowJson {
    grid: &'static str,
    dtype: &'static str,
    batch: usize,
    s_q: usize,
    h_q: usize,
    h_kv: usize,
    mean_seqlen: usize,
    /// Σs_k, or for a sparse row the selected token rows read.
    total_seqlen: u64,
    /// Sparse rows: selected tokens per query token.
    #[serde(skip_serializing_if = "Option::is_none")]
    topk: Option<usize>,
    varlen: bool,
    causal: bool,
    iters: usize,
    median_ms: f64,
    best_ms: f64,
    gbs: f64,
    gflops: f64,
    copy_gbs: Option<f64>,
    fma_gflops: Option<f64>,
    pct_copy_bw: Option<f64>,
    pct_fma_peak: Option<f64>,
}

fn write_json(path: &Path, device: &str, backend: &str, ceil: Option<Ceilings>, rows: &[Row]) -> CliResult {
    let run = RunJson {
        backend,
        device,
        ceilings: ceil.map(|c| CeilJson {
            copy_gbs: round(c.copy_gbs, 2),
            fma_gflops: round(c.fma_gflops, 2),
            threads: c.threads,
        }),
        results: rows
            .iter()
            .map(|r| {
                let sp = r.cfg.shape();
                RowJson {
                    grid: r.cfg.grid,
                    dtype: sp.dtype,
                    batch: sp.batch,
                    s_q: sp.s_q,
                    h_q: sp.h_q,
                    h_kv: sp.h_kv,
                    mean_seqlen: sp.mean_seqlen,
                    total_seqlen: r.total_seqlen,
                    topk: sp.topk,
                    varlen: sp.varlen,
                    causal: sp.causal,
                    iters: r.iters,
                    median_ms: round(r.median_s * 1e3, 4),
                    best_ms: round(r.best_s * 1e3, 4),
                    gbs: round(r.gbs, 2),
                    gflops: round(r.gflops, 2),
                    copy_gbs: r.ceil.map(|c| round(c.copy_gbs, 2)),
                    fma_gflops: r.ceil.map(|c| round(c.fma_gflops, 2)),
                    pct_copy_bw: pct(r.gbs, r.ceil.map(|c| c.copy_gbs)),
                    pct_fma_peak: pct(r.gflops, r.ceil.map(|c| c.fma_gflops)),
                }
            })
            .collect(),
    };
    save_json(path, &run)
}

/// Runs `flashmla bench`: `--from-json` plots a saved run; `--backend hopper` (and `auto` where the Hopper
/// backend opens) is [`crate::bench_hopper`], upstream's benchmark on the GPU; every other backend runs the grid
/// above.
pub fn run(args: &BenchArgs) -> CliResult {
    if let Some(saved) = &args.from_json {
        let Some(out) = &args.plot else {
            return Err(cli_err!("--from-json needs --plot FILE (it draws a saved run, it does not run one)"));
        };
        plot::draw(&plot::from_saved(saved)?, out)?;
        println!("wrote {}", out.display());
        return Ok(());
    }
    let backend_name = args.backend.as_str();
    let ordinal = args.device;
    if backend_name == "hopper"
        || (backend_name == "auto" && flashmla::open_backend("auto", ordinal).is_ok_and(|b| b.name() == "hopper"))
    {
        #[cfg(feature = "cuda")]
        return crate::bench_hopper::run(args);
        #[cfg(not(feature = "cuda"))]
        return Err(cli_err!("--backend hopper: the GPU benchmark is not built (built without the `cuda` feature)"));
    }
    if let Some(name) = hopper_only_given(args) {
        return Err(cli_err!("--{name} applies to --backend hopper only"));
    }
    let threads = args.threads;
    let min_iters: usize = args.iters.unwrap_or(3);
    let min_time: f64 = args.min_time.unwrap_or(0.3);
    let no_ceilings = args.no_ceilings;
    let configs = grid(args)?;
    if args.dry_run {
        println!("{} configurations (--dry-run: nothing runs)", configs.len());
        for c in &configs {
            let s = c.shape();
            println!(
                "{:<9} {:<6} h_q={:<4} h_kv={:<3} s_q={} b={} s_k={}{}{}{}",
                c.grid,
                s.dtype,
                s.h_q,
                s.h_kv,
                s.s_q,
                s.batch,
                s.mean_seqlen,
                s.topk.map_or(String::new(), |k| format!(" topk={k}")),
                if s.varlen { " varlen" } else { "" },
                if s.causal { " causal" } else { "" },
            );
        }
        return Ok(());
    }
    if threads == Some(0) {
        return Err(cli_err!("--threads: expected a value >= 1, got 0"));
    }
    if !(min_time.is_finite() && min_time >= 0.0) {
        return Err(cli_err!("--min-time: expected seconds >= 0, got {min_time}"));
    }
    let backend: Box<dyn MlaBackend> = match (backend_name, threads) {
        ("cpu", t) => Box::new(CpuBackend::with_options(CpuOptions { threads: t, isa: None })?),
        (_, Some(_)) => return Err(cli_err!("--threads applies to --backend cpu only")),
        (name, None) => flashmla::open_backend(name, ordinal)?,
    };
    let device = backend.capabilities().device_name.clone();
    println!("backend: {} on {device}", backend.name());
    let cpu = CpuBackend::with_options(CpuOptions { threads, isa: None })?;
    let ceil = if backend.name() == "cpu" && !no_ceilings {
        let c = roofline::measure(&cpu);
        let read = cpu.install(|| roofline::read_bandwidth(256 << 20, 5));
        println!(
            "ceilings: copy {:.1} GB/s (STREAM-like, read + write), FMA peak {:.1} GFLOP/s ({} threads); ridge {:.1} \
             FLOP/byte; read-only sum {read:.1} GB/s (for reference)",
            c.copy_gbs,
            c.fma_gflops,
            c.threads,
            c.fma_gflops / c.copy_gbs
        );
        Some(c)
    } else {
        None
    };
    if ceil.is_some() {
        println!(
            "(copy and FMA are re-measured next to every row, the %s are against those: the load of a shared machine changes)"
        );
    }
    println!("{}  bound", TABLE.header());
    let mut rows = Vec::new();
    // Each row's weight in the estimate of the time left: its FLOPs, plus one --min-time's worth of the mean so
    // that small rows, which still time at least --min-time, are not counted as free.
    let flops: Vec<f64> = configs.iter().map(|c| nominal_flops(&c.spec)).collect();
    let floor = flops.iter().sum::<f64>() / flops.len().max(1) as f64 * min_time.min(1.0);
    let costs = flops.iter().map(|f| f + floor).collect();
    let mut progress = Progress::new(costs, false);
    for cfg in configs {
        let local = ceil.map(|_| roofline::measure_quick(&cpu));
        let m = measure(backend.as_ref(), &cfg.spec, min_iters.max(1), min_time)?;
        let t = m.timing.median();
        let row = Row {
            ceil: local,
            total_seqlen: m.tokens,
            median_s: t,
            best_s: m.timing.min(),
            iters: m.timing.samples.len(),
            gbs: m.bytes / t / 1e9,
            gflops: m.flops / t / 1e9,
            cfg,
        };
        let copy = local.map(|c| c.copy_gbs);
        let fma = local.map(|c| c.fma_gflops);
        let bound = match local {
            Some(c) if m.flops / m.bytes < c.fma_gflops / c.copy_gbs => "memory",
            Some(_) => "compute",
            None => "-",
        };
        let sp = row.cfg.shape();
        let cells = TABLE.row(&[
            &row.cfg.grid,
            &sp.dtype,
            &sp.h_q,
            &sp.h_kv,
            &sp.s_q,
            &sp.batch,
            &row.total_seqlen,
            &format!("{:.3}", t * 1e3),
            &format!("{:.1}", row.gbs),
            &format!("{:.1}", row.gflops),
            &or_dash(copy, 1),
            &or_dash(fma, 1),
            &or_dash(copy.map(|c| 100.0 * row.gbs / c), 0),
            &or_dash(fma.map(|f| 100.0 * row.gflops / f), 0),
        ]);
        println!("{cells}  {bound}");
        progress.step(&format!("{} {} h_q={} s_q={}", row.cfg.grid, sp.dtype, sp.h_q, sp.s_q));
        rows.push(row);
    }
    if let Some(path) = &args.json {
        write_json(path, &device, backend.name(), ceil, &rows)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        let plot = Plot {
            title: format!("flashmla bench, {} on {device}", backend.name()),
            copy_gbs: ceil.map(|c| c.copy_gbs),
            peak_gflops: ceil.map(|c| c.fma_gflops),
            anchor_label: plot::anchor_label(None),
            points: rows
                .iter()
                .map(|r| Point { dtype: r.cfg.shape().dtype.into(), gflops: r.gflops, gbs: r.gbs, anchor_gflops: None })
                .collect(),
        };
        plot::draw(&plot, path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
