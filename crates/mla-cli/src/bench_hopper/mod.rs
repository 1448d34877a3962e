//! `flashmla bench --backend hopper`: upstream FlashMLA's decode benchmark on the Hopper kernels, against
//! upstream's own figures on the same kind of device (H100 or H200, [`crate::anchors`]; `--anchors` picks).
//!
//! | grid | configurations (per dtype) |
//! |---|---|
//! | `upstream` (default) | b = 128, h_kv = 1, s_k ∈ {4096, 8192, 16384} × {fixed, varlen}, h_q ∈ {16, 32, 64, 128}, s_q ∈ {1, 2} |
//! | `small` | small and imbalanced batches (docs/log/performance.md): b = 4 with lengths [4641, 45118, 1730, 1696], s_q = 4, h_q = 16; b ∈ {1, 2, 4, 8} × s_k ∈ {1k, 4k, 16k, 64k}, s_q = 1, h_q = 128 |
//!
//! Method: every input set (KV cache + Q) is allocated `--sets` times (default 2) and the launches rotate between
//! them, so no launch finds its cache in L2 (50 MB; one set of the smallest upstream configuration is 600 MB).
//! The whole `decode` call (split kernel + combine) is timed with CUDA events on the device's default stream,
//! `--iters` times after as many warm-up calls (at least 3), and the median is reported; `get_mla_metadata` (the
//! scheduler kernel) is timed the same way on its own. The events of all launches are queued before one
//! synchronisation, so the GPU runs them back to back and the times exclude the host's launch latency (as upstream's
//! `triton.testing.do_bench`); `--sync-each` waits for every launch instead (the timing of the former
//! `hopper-bench` example, which adds the host's time to enqueue each call). Each row also reports the host's own
//! time per call (`host_us`, `sched_host`: up to 200 calls enqueued back to back, no events, then one
//! synchronisation), which is what a Rust host pays per layer on the CPU side.
//!
//! Each dtype runs causal or not as upstream's figures of that device did (H100: BF16/FP16 causal, E4M3
//! non-causal; H200: all causal); `--no-causal` makes every dtype non-causal. Varlen lengths are
//! `max(N(s_k, s_k/2), 2)` from `--seed`. Caches and queries are two independent 16 MiB random patterns, each tiled
//! (one pattern for both would make query rows equal to key rows: a few huge logits per row, not upstream's
//! inputs); block tables are random permutations of the pages.
//!
//! Formulas (upstream's): FLOPs = 2·s_q·Σs_k·h_q·(576+512); bytes = elt·(Σs_k·576 + b·s_q·h_q·576) + 2·b·s_q·h_q·512.
//! `ratio` = upstream ms / our ms (> 1: faster than upstream). The device's copy bandwidth (2 GiB device-to-device,
//! read + write counted) is measured first in the same run.

mod grid; // the configurations: upstream's grid and the small batches, costs, --dry-run
mod measure; // device buffers, CUDA-event timing, host µs per call
mod report; // table lines, --json, --plot

use std::path::PathBuf;

use mla_core::DType;

use self::grid::{Grid, Rng, batches, costs, dry_run};
use self::measure::{GpuBench, random_pattern};
use self::report::{Row, draw_plot, write_json};
use crate::anchors::{ANCHOR_BATCH, AnchorSet, Which};
use crate::args::{BenchArgs, CliResult};
use crate::cli_err;
use crate::progress::Progress;

/// Upstream's grid: context lengths, query heads, query tokens per request.
const UPSTREAM_SKS: [usize; 3] = [4096, 8192, 16384];
const UPSTREAM_HQS: [usize; 4] = [16, 32, 64, 128];
const UPSTREAM_SQS: [usize; 2] = [1, 2];
/// Timed launches per configuration (`--iters`), after as many warm-ups.
const DEFAULT_ITERS: usize = 30;
/// Input sets the launches rotate over (`--sets`): with two, consecutive launches read different caches, so none
/// finds the previous launch's data in L2.
const DEFAULT_SETS: usize = 2;

/// Parsed options of `bench --backend hopper`.
#[derive(Debug)]
struct Options {
    grid: Grid,
    dtypes: Vec<DType>,
    batch: usize,
    sks: Vec<usize>,
    hqs: Vec<usize>,
    sqs: Vec<usize>,
    /// `false` = fixed lengths, `true` = varlen.
    modes: Vec<bool>,
    /// `None`: per dtype as upstream ran it on the anchors' device; `Some(false)`: `--no-causal`.
    causal: Option<bool>,
    /// `--anchors`, if given (else the device's own).
    anchors: Option<Which>,
    iters: usize,
    sets: usize,
    sync_each: bool,
    seed: u64,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
    ceilings: bool,
    dry_run: bool,
    ordinal: i32,
}

impl Options {
    /// Whether `dtype` runs causal: as upstream ran it in `anchors`, unless `--no-causal`.
    fn causal(&self, dtype: DType, anchors: &AnchorSet) -> bool {
        self.causal.or(anchors.causal(dtype)).unwrap_or(dtype != DType::E4M3)
    }
}

/// A list option that has an alias (`--dtype` / `--dtypes`); at most one of the two may be given.
fn list_opt<T: Clone>(name: &str, alias: &str, a: &Option<Vec<T>>, b: &Option<Vec<T>>) -> CliResult<Option<Vec<T>>> {
    match (a, b) {
        (Some(_), Some(_)) => Err(cli_err!("give --{name} or --{alias}, not both")),
        (Some(v), None) | (None, Some(v)) if v.is_empty() => Err(cli_err!("--{name}: empty list")),
        (a, b) => Ok(a.clone().or(b.clone())),
    }
}

fn parse(args: &BenchArgs) -> CliResult<Options> {
    let grid = match args.grid.as_deref().unwrap_or("upstream") {
        "upstream" => Grid::Upstream,
        "small" => Grid::Small,
        other => return Err(cli_err!("--grid: expected upstream or small with --backend hopper, got `{other}`")),
    };
    let dtypes: Vec<DType> =
        list_opt("dtype", "dtypes", &args.dtype, &args.dtypes)?.unwrap_or_else(|| DType::ALL.to_vec());
    let batch: Option<usize> = args.batch;
    let sks: Option<Vec<usize>> = list_opt("sk", "seqlen", &args.sk, &args.seqlen)?;
    let hqs: Option<Vec<usize>> = list_opt("h-q", "hq", &args.h_q, &args.hq)?;
    let sqs: Option<Vec<usize>> = list_opt("s-q", "sq", &args.s_q, &args.sq)?;
    // `--varlen` alone: varlen lengths only; `--varlen fixed,varlen` (the former example's form): a list.
    let modes: Option<Vec<bool>> = match &args.varlen {
        Some(Some(v)) => Some(
            v.split(',')
                .map(|m| match m.trim() {
                    "fixed" => Ok(false),
                    "varlen" => Ok(true),
                    other => Err(cli_err!("--varlen: expected fixed and/or varlen, got `{other}`")),
                })
                .collect::<CliResult<_>>()?,
        ),
        Some(None) => Some(vec![true]),
        None => None,
    };
    let iters: usize = args.iters.unwrap_or(DEFAULT_ITERS);
    let sets: usize = args.sets.unwrap_or(DEFAULT_SETS);
    let opts = Options {
        grid,
        dtypes,
        batch: batch.unwrap_or(ANCHOR_BATCH),
        sks: sks.clone().unwrap_or_else(|| UPSTREAM_SKS.to_vec()),
        hqs: hqs.clone().unwrap_or_else(|| UPSTREAM_HQS.to_vec()),
        sqs: sqs.clone().unwrap_or_else(|| UPSTREAM_SQS.to_vec()),
        modes: modes.clone().unwrap_or_else(|| vec![false, true]),
        causal: args.no_causal.then_some(false),
        anchors: args.anchors.as_deref().and_then(Which::parse),
        iters,
        sets,
        sync_each: args.sync_each,
        seed: args.seed.unwrap_or(0),
        json: args.json.clone(),
        plot: args.plot.clone(),
        ceilings: !args.no_ceilings,
        dry_run: args.dry_run,
        ordinal: args.device,
    };
    for (cpu_only, given) in [
        ("threads", args.threads.is_some()),
        ("min-time", args.min_time.is_some()),
        ("topk", args.topk.is_some()),
        ("layout", args.layout.is_some()),
    ] {
        if given {
            return Err(cli_err!("--{cpu_only} applies to --backend cpu only"));
        }
    }
    if grid == Grid::Small {
        let given = [("batch", batch.is_some()), ("sk", sks.is_some()), ("h-q", hqs.is_some())]
            .into_iter()
            .chain([("s-q", sqs.is_some()), ("varlen", modes.is_some())]);
        if let Some((name, _)) = given.into_iter().find(|g| g.1) {
            return Err(cli_err!("--{name} applies to --grid upstream only (--grid small has fixed shapes)"));
        }
    }
    if opts.iters == 0 || opts.sets == 0 {
        return Err(cli_err!("--iters and --sets take values >= 1"));
    }
    if opts.batch == 0 || [&opts.sks, &opts.hqs, &opts.sqs].iter().any(|l| l.contains(&0)) {
        return Err(cli_err!("--batch, --sk, --h-q and --s-q take values >= 1"));
    }
    Ok(opts)
}

/// Runs `flashmla bench --backend hopper` (also `--backend auto` where the Hopper backend opens). The options are
/// checked before the device is opened; without a usable GPU this fails with the backend's one-line reason.
pub fn run(args: &BenchArgs) -> CliResult {
    let opts = parse(args)?;
    if opts.dry_run {
        let anchors = AnchorSet::load(opts.anchors.unwrap_or(Which::H100));
        println!("anchors: {} ({}, {})", anchors.file, anchors.device, anchors.date);
        dry_run(&opts, &anchors);
        return Ok(());
    }
    let be = flashmla::open_backend("hopper", opts.ordinal)?;
    let be = be.as_ref();
    let gpu = GpuBench::open(be, &opts)?;
    let caps = be.capabilities();
    println!("device: {} ({} SMs), {}", caps.device_name, caps.sm_count, mla_hopper::build_info());
    let (which, own) = Which::for_device(&caps.device_name);
    let anchors = AnchorSet::load(opts.anchors.unwrap_or(which));
    let whose = match (opts.anchors, own) {
        (Some(_), _) => "as --anchors asks",
        (None, true) => "this kind of device",
        (None, false) => "no figures for this device: the H100's, for reference",
    };
    println!(
        "anchors: upstream on {} ({}, {}, copy {:.0} GB/s; {whose})",
        anchors.device, anchors.file, anchors.date, anchors.copy_gbs
    );
    let anchors = &anchors;
    let copy_gbs = if opts.ceilings { Some(gpu.copy_gbs()?) } else { None };
    if let Some(c) = copy_gbs {
        println!("copy ceiling: {c:.0} GB/s (2 GiB device-to-device, read + write)");
    }
    let timing = if opts.sync_each { "each launch synchronised" } else { "launches queued back to back" };
    // The JSON is rewritten after every row, so a run cut short by a time limit still leaves its rows.
    let save =
        |rows: &[Row]| opts.json.as_ref().map_or(Ok(()), |path| write_json(path, be, copy_gbs, anchors, &opts, rows));
    let mut rows = Vec::new();
    save(&rows)?; // an unwritable path fails now, not after the first configuration
    let mut progress = Progress::new(costs(&opts), false);
    let mut rng = Rng::new(opts.seed);
    match opts.grid {
        Grid::Upstream => println!(
            "b = {}, h_kv = 1: whole decode call (split + combine), median of {} launches rotating {} input sets \
             ({timing}); seed {}",
            opts.batch, opts.iters, opts.sets, opts.seed
        ),
        Grid::Small => println!(
            "small batches: whole decode call (split + combine), median of {} launches rotating {} input sets \
             ({timing})",
            opts.iters, opts.sets
        ),
    }
    println!("{}", report::table(opts.grid).header());
    let batches = batches(&opts);
    for &dtype in &opts.dtypes {
        let causal = opts.causal(dtype, anchors);
        let (pattern, q_pattern) = (random_pattern(&mut rng, dtype), random_pattern(&mut rng, dtype));
        for batch in &batches {
            let caches = gpu.caches(&mut rng, dtype, &batch.seqlens, &pattern)?;
            for &(h_q, s_q) in &batch.heads {
                let m = gpu.measure(&caches, h_q, s_q, causal, &q_pattern)?;
                let anchor = batch.anchor(anchors, dtype, h_q, s_q, causal);
                let row = Row::new(batch, dtype, (h_q, s_q), causal, m, anchor);
                println!("{}", row.line());
                let label = row.label();
                rows.push(row);
                save(&rows)?;
                progress.step(&label);
            }
        }
    }
    if let Some(path) = &opts.json {
        println!("wrote {}", path.display());
    }
    if let Some(path) = &opts.plot {
        draw_plot(path, &caps.device_name, copy_gbs, anchors, &rows)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
