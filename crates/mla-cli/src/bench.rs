//! `flashmla bench`: upstream's benchmark grid, scaled to this machine, with upstream's formulas and this
//! machine's measured ceilings. `--backend hopper` runs upstream's full grid on the GPU instead
//! ([`crate::bench_hopper`]).
//!
//! | grid | configurations (per dtype) | why |
//! |---|---|---|
//! | `upstream` | h_kv = 1, h_q ∈ {16, 32, 64, 128}, s_q ∈ {1, 2}, b = 16, s_k = 4096 (upstream: b = 128) | the published grid; on a CPU every row is compute-bound (M = s_q·h_q ≥ 16 query rows share each K row) |
//! | `mem` | h_q = h_kv = 16 (M = s_q), s_q ∈ {1, 2}, b = 16, s_k = 256 | memory-bound rows, to compare against the copy bandwidth |
//!
//! FLOPs = `2·s_q·Σs_k·h_q·(576+512)`; bytes = `elt·(Σs_k·h_kv·576 + b·s_q·h_q·576) + out_elt·b·s_q·h_q·512`.
//! A row is memory-bound when FLOPs/bytes is below the measured ridge (FMA peak / copy bandwidth). The ceilings are
//! measured once up front (about a second) and again, briefly, before every row: on a shared machine the load
//! changes from one row to the next, and each row's percentages are against the ceilings measured next to it.

use std::fmt::Write as _;
use std::path::Path;

use mla_core::{DType, MlaBackend};
use mla_cpu::problem::{HostProblem, RandomSpec};
use mla_cpu::roofline::{self, Ceilings};
use mla_cpu::{CpuBackend, CpuOptions};

use crate::args::{Args, CliResult};
use crate::{cli_err, exec};

/// One configuration of the grid.
#[derive(Clone, Debug)]
struct Config {
    grid: &'static str,
    spec: RandomSpec,
}

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

fn grid(args: &Args) -> CliResult<Vec<Config>> {
    let dtypes: Vec<DType> = match args.list::<String>("dtype")? {
        None => DType::ALL.to_vec(),
        Some(v) => v
            .iter()
            .map(|s| DType::parse(s).ok_or_else(|| cli_err!("--dtype: `{s}` is not bf16, fp16 or e4m3")))
            .collect::<CliResult<_>>()?,
    };
    let h_qs: Vec<usize> = args.list("h-q")?.unwrap_or_else(|| vec![16, 32, 64, 128]);
    let s_qs: Vec<usize> = args.list("s-q")?.unwrap_or_else(|| vec![1, 2]);
    let batch: usize = args.parsed_or("batch", 16)?;
    let seqlen: Option<usize> = args.parsed("seqlen")?;
    if args.value("varlen").is_some() {
        return Err(cli_err!("--varlen takes no value (a list of fixed,varlen is for --backend hopper)"));
    }
    let varlen = args.flag("varlen");
    let causal = !args.flag("no-causal");
    let which = args.value("grid").unwrap_or("all").to_string();
    let seed: u64 = args.parsed_or("seed", 0)?;
    if !matches!(which.as_str(), "all" | "upstream" | "mem") {
        return Err(cli_err!("--grid: expected all, upstream or mem, got `{which}`"));
    }
    if batch == 0 || h_qs.contains(&0) || s_qs.contains(&0) || seqlen == Some(0) {
        return Err(cli_err!("--batch, --h-q, --s-q and --seqlen take values >= 1"));
    }
    let spec = |dtype, h_q, h_kv, s_q, s_k| RandomSpec {
        batch,
        s_q,
        h_q,
        h_kv,
        mean_seqlen: seqlen.unwrap_or(s_k),
        varlen,
        page_size: 64,
        dtype,
        causal,
        seed,
    };
    let mut out = Vec::new();
    for &dtype in &dtypes {
        if which != "mem" {
            for &h_q in &h_qs {
                for &s_q in &s_qs {
                    out.push(Config { grid: "upstream", spec: spec(dtype, h_q, 1, s_q, 4096) });
                }
            }
        }
        if which != "upstream" {
            for &s_q in &s_qs {
                out.push(Config { grid: "mem", spec: spec(dtype, 16, 16, s_q, 256) });
            }
        }
    }
    Ok(out)
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn write_json(path: &str, device: &str, backend: &str, ceil: Option<Ceilings>, rows: &[Row]) -> CliResult {
    let mut s = String::new();
    let c = match ceil {
        Some(c) => format!(
            "{{\"copy_gbs\": {:.2}, \"fma_gflops\": {:.2}, \"threads\": {}}}",
            c.copy_gbs, c.fma_gflops, c.threads
        ),
        None => "null".into(),
    };
    let _ = write!(
        s,
        "{{\n  \"backend\": \"{backend}\",\n  \"device\": \"{}\",\n  \"ceilings\": {c},\n  \"results\": [",
        json_escape(device)
    );
    for (k, r) in rows.iter().enumerate() {
        let sp = &r.cfg.spec;
        let pct = |x: f64, of: Option<f64>| of.map_or("null".into(), |o| format!("{:.1}", 100.0 * x / o));
        let num = |of: Option<f64>| of.map_or("null".into(), |o| format!("{o:.2}"));
        let _ = write!(
            s,
            "{}\n    {{\"grid\": \"{}\", \"dtype\": \"{}\", \"batch\": {}, \"s_q\": {}, \"h_q\": {}, \"h_kv\": {}, \
             \"mean_seqlen\": {}, \"total_seqlen\": {}, \"varlen\": {}, \"causal\": {}, \"iters\": {}, \
             \"median_ms\": {:.4}, \"best_ms\": {:.4}, \"gbs\": {:.2}, \"gflops\": {:.2}, \"copy_gbs\": {}, \
             \"fma_gflops\": {}, \"pct_copy_bw\": {}, \"pct_fma_peak\": {}}}",
            if k == 0 { "" } else { "," },
            r.cfg.grid,
            sp.dtype,
            sp.batch,
            sp.s_q,
            sp.h_q,
            sp.h_kv,
            sp.mean_seqlen,
            r.total_seqlen,
            sp.varlen,
            sp.causal,
            r.iters,
            r.median_s * 1e3,
            r.best_s * 1e3,
            r.gbs,
            r.gflops,
            num(r.ceil.map(|c| c.copy_gbs)),
            num(r.ceil.map(|c| c.fma_gflops)),
            pct(r.gbs, r.ceil.map(|c| c.copy_gbs)),
            pct(r.gflops, r.ceil.map(|c| c.fma_gflops)),
        );
    }
    s.push_str("\n  ]\n}\n");
    std::fs::write(path, s).map_err(|e| cli_err!("{path}: cannot write: {e}"))
}

/// Runs `flashmla bench`: `--backend hopper` (and `auto` where the Hopper backend opens) is
/// [`crate::bench_hopper`], upstream's benchmark on the GPU; every other backend runs the grid above.
pub fn run(args: &Args) -> CliResult {
    let backend_name = args.value("backend").unwrap_or("cpu").to_string();
    let ordinal: i32 = args.parsed_or("device", 0)?;
    if backend_name == "hopper"
        || (backend_name == "auto" && flashmla::open_backend("auto", ordinal).is_ok_and(|b| b.name() == "hopper"))
    {
        return crate::bench_hopper::run(args);
    }
    let threads: Option<usize> = args.parsed("threads")?;
    let min_iters: usize = args.parsed_or("iters", 3)?;
    let min_time: f64 = args.parsed_or("min-time", 0.3)?;
    let json: Option<String> = args.value("json").map(str::to_string);
    let no_ceilings = args.flag("no-ceilings");
    let configs = grid(args)?;
    args.finish()?;
    if threads == Some(0) {
        return Err(cli_err!("--threads: expected a value >= 1, got 0"));
    }

    let backend: Box<dyn MlaBackend> = match (backend_name.as_str(), threads) {
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
    println!(
        "{:<9} {:<5} {:>5} {:>4} {:>4} {:>3} {:>8} {:>10} {:>9} {:>9} {:>6} {:>6} {:>7} {:>7}  bound",
        "grid", "dtype", "h_q", "h_kv", "s_q", "b", "Σs_k", "ms", "GB/s", "GFLOP/s", "copy", "fma", "%copy", "%fma"
    );
    let mut rows = Vec::new();
    for cfg in configs {
        let p = HostProblem::random(&cfg.spec);
        let local = ceil.map(|_| roofline::measure_quick(&cpu));
        let (_, timing) = exec::time_decode(backend.as_ref(), &p, min_iters.max(1), 1000, min_time)?;
        let t = timing.median();
        let row = Row {
            ceil: local,
            total_seqlen: p.total_seqlen(),
            median_s: t,
            best_s: timing.min(),
            iters: timing.samples.len(),
            gbs: p.bytes() / t / 1e9,
            gflops: p.flops() / t / 1e9,
            cfg,
        };
        let (copy, fma, pbw, pfma, bound) = match local {
            Some(c) => {
                let intensity = p.flops() / p.bytes();
                (
                    format!("{:.1}", c.copy_gbs),
                    format!("{:.1}", c.fma_gflops),
                    format!("{:.0}", 100.0 * row.gbs / c.copy_gbs),
                    format!("{:.0}", 100.0 * row.gflops / c.fma_gflops),
                    if intensity < c.fma_gflops / c.copy_gbs { "memory" } else { "compute" },
                )
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-"),
        };
        let sp = &row.cfg.spec;
        println!(
            "{:<9} {:<5} {:>5} {:>4} {:>4} {:>3} {:>8} {:>10.3} {:>9.1} {:>9.1} {copy:>6} {fma:>6} {pbw:>7} {pfma:>7}  \
             {bound}",
            row.cfg.grid,
            sp.dtype.name(),
            sp.h_q,
            sp.h_kv,
            sp.s_q,
            sp.batch,
            row.total_seqlen,
            t * 1e3,
            row.gbs,
            row.gflops,
        );
        rows.push(row);
    }
    if let Some(path) = json {
        write_json(&path, &device, backend.name(), ceil, &rows)?;
        println!("wrote {}", Path::new(&path).display());
    }
    Ok(())
}
