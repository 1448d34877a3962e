//! `flashmla demo`: an engine-like decode step on the best available backend, checked and timed.
//!
//! ```text
//!  random problem (varlen lengths, NaN cache tails and spare pages, permuted block table with garbage past the end)
//!    ├─ backend (auto: hopper if it opens, else cpu): warm-up + timed calls ─► time, GB/s, TFLOP/s (upstream formulas)
//!    ├─ CPU reference on one thread: bitwise equal if the backend is the CPU (determinism), else upstream tolerances
//!    └─ float64 spot check of sampled rows from the definition
//! ```
//! `--mode sparse`: the same steps for a top-k decode over an FP8 cache (docs/sparse-fp8.md): a random problem of
//! [`Fp8HostProblem::random`] (varlen contexts, `topk_length`, `attn_sink` with ±inf heads, invalid, duplicate
//! and all-invalid selections, NaN tokens that no valid entry reaches, optionally an extra cache), checked against
//! the CPU reference on one thread and rows from a float64 reference ([`crate::sparse::reference_row`]). A
//! backend without FP8 support (Hopper, for now) fails with its own `Unsupported` error.
//!
//! Exit status 0 only if every check passes.

use std::path::Path;

use mla_core::{DType, Fp8Layout, HEAD_DIM_K, HEAD_DIM_V};
use mla_cpu::fp8problem::{ExtraSpec, Fp8HostMode, Fp8HostProblem, Fp8RandomSpec, SparseSpec};
use mla_cpu::problem::{HostOutputs, HostProblem, RandomSpec};
use mla_cpu::{CpuBackend, CpuOptions};

use crate::args::{CliResult, DemoArgs};
use crate::check;
use crate::{cli_err, exec, npy, sparse};

/// Fraction of selected entries made invalid (−1, other negatives, past the cache) in `--mode sparse`.
const SPARSE_INVALID: f64 = 0.05;
/// Fraction of selected entries made duplicates of an earlier entry of their row.
const SPARSE_DUPLICATES: f64 = 0.02;
/// Fraction of (request, token) rows whose every entry is invalid.
const SPARSE_EMPTY_ROWS: f64 = 0.02;

/// Runs `flashmla demo`.
pub fn run(args: &DemoArgs) -> CliResult {
    if args.mode == "sparse" {
        return run_sparse(args);
    }
    let dtype = args.dtype.unwrap_or(DType::Bf16);
    let spec = RandomSpec {
        batch: args.batch,
        s_q: args.s_q,
        h_q: args.h_q,
        h_kv: args.h_kv,
        mean_seqlen: args.seqlen,
        varlen: !args.fixed_len,
        page_size: args.page_size,
        dtype,
        causal: !args.no_causal,
        seed: args.seed,
    };
    let (iters, samples) = (args.iters, args.check_rows);
    for (name, v) in [("batch", spec.batch), ("s-q", spec.s_q), ("h-q", spec.h_q), ("h-kv", spec.h_kv)] {
        if v == 0 {
            return Err(cli_err!("--{name}: expected a value >= 1, got 0"));
        }
    }
    if spec.page_size == 0 || !spec.h_q.is_multiple_of(spec.h_kv) {
        return Err(cli_err!("--page-size must be >= 1 and --h-kv must divide --h-q"));
    }

    let backend = flashmla::open_backend(&args.backend, args.device)?;
    let p = HostProblem::random(&spec);
    println!(
        "problem: b={} s_q={} h_q={} h_kv={} {} page_size={} {}, lengths {} (mean {:.0}, min {}, max {}), \
         cache {:.1} MB with NaN tails, permuted block table",
        p.batch,
        p.s_q,
        p.h_q,
        p.h_kv,
        check::describe_dtype(dtype),
        p.page_size,
        if p.causal { "causal" } else { "non-causal" },
        if spec.varlen { "varlen" } else { "fixed" },
        p.total_seqlen() as f64 / p.batch as f64,
        p.seqlens.iter().min().unwrap_or(&0),
        p.seqlens.iter().max().unwrap_or(&0),
        p.kv.len() as f64 * dtype.size_bytes() as f64 / 1e6,
    );
    println!("backend: {} on {}", backend.name(), backend.capabilities().device_name);

    let (got, timing) = exec::time_decode(backend.as_ref(), &p, iters.max(1), iters.max(1), 0.0)?;
    let t = timing.median();
    println!(
        "time: {:.3} ms median of {} (best {:.3} ms); {:.1} GB/s, {:.2} TFLOP/s",
        t * 1e3,
        timing.samples.len(),
        timing.min() * 1e3,
        p.bytes() / t / 1e9,
        p.flops() / t / 1e12
    );

    let tols = check::tolerances(dtype, backend.name());
    // 1. Against the CPU reference backend on one thread.
    let reference = CpuBackend::with_options(CpuOptions { threads: Some(1), isa: None })?;
    let want = exec::run_decode(&reference, &p)?;
    let mut failures = check::against_cpu_run(
        backend.name(),
        got.bitwise_eq(&want),
        (&got.out, &got.lse),
        (&want.out, &want.lse),
        tols,
    );

    // 2. Sampled rows against float64 from the definition.
    let rows = check::sample_rows(&p, samples);
    failures.extend(
        check::sampled_rows(&rows, (p.s_q, p.h_q), (&got.out, &got.lse), tols, |i, t, h| {
            Ok::<_, std::convert::Infallible>(check::reference_row(&p, i, t, h))
        })
        .unwrap_or_else(|never| match never {}),
    );

    if let Some(dir) = &args.save {
        save_problem(dir, &p, &got)?;
    }
    if failures.is_empty() {
        println!("PASS");
        Ok(())
    } else {
        Err(cli_err!("check FAILED: {}", failures.join("; ")))
    }
}

/// `flashmla demo --mode sparse`.
fn run_sparse(args: &DemoArgs) -> CliResult {
    if let Some(d) = args.dtype
        && d != DType::Bf16
    {
        return Err(cli_err!("--dtype: --mode sparse takes bf16 queries over an FP8 cache, got --dtype {d}"));
    }
    if args.h_kv != 1 {
        return Err(cli_err!("--h-kv: an FP8 cache holds one KV head (--mode sparse), got {}", args.h_kv));
    }
    for (name, v) in [("batch", args.batch), ("s-q", args.s_q), ("h-q", args.h_q), ("page-size", args.page_size)] {
        if v == 0 {
            return Err(cli_err!("--{name}: expected a value >= 1, got 0"));
        }
    }
    if args.topk == 0 {
        return Err(cli_err!("--topk: expected a value >= 1, got 0"));
    }
    let layout = Fp8Layout::parse(&args.layout).ok_or_else(|| cli_err!("--layout: expected v32 or model1"))?;
    let spec = Fp8RandomSpec {
        layout,
        batch: args.batch,
        s_q: args.s_q,
        h_q: args.h_q,
        page_size: args.page_size,
        mean_seqlen: args.seqlen,
        varlen: !args.fixed_len,
        sparse: Some(SparseSpec {
            topk: args.topk,
            topk_length: true,
            attn_sink: true,
            extra: (args.extra_topk > 0).then_some(ExtraSpec {
                topk: args.extra_topk,
                page_size: args.page_size,
                mean_seqlen: args.seqlen,
                topk_length: true,
            }),
            invalid: SPARSE_INVALID,
            duplicates: SPARSE_DUPLICATES,
            empty_rows: SPARSE_EMPTY_ROWS,
        }),
        causal: false,
        seed: args.seed,
    };
    let backend = flashmla::open_backend(&args.backend, args.device)?;
    let p = Fp8HostProblem::random(&spec)?;
    let Fp8HostMode::Sparse { main, extra, .. } = &p.mode else { unreachable!("a sparse spec makes a sparse problem") };
    println!(
        "problem: sparse decode over an FP8 {} cache ({} bytes/token), b={} s_q={} h_q={} page_size={} topk={}{}, \
         {} tokens read (topk_length, attn_sink with ±inf heads, invalid/duplicate/empty selections), cache {:.1} MB",
        layout.name(),
        layout.bytes_per_token(),
        p.batch,
        p.s_q,
        p.h_q,
        args.page_size,
        main.topk,
        extra.as_ref().map_or(String::new(), |e| format!(" + extra topk={}", e.topk)),
        sparse::rows_read(&p),
        (main.cache.bytes.len() + extra.as_ref().map_or(0, |e| e.cache.bytes.len())) as f64 / 1e6,
    );
    println!("backend: {} on {}", backend.name(), backend.capabilities().device_name);

    let iters = args.iters.max(1);
    let (got, timing) = exec::time_fp8(backend.as_ref(), &p, iters, iters, 0.0)?;
    let t = timing.median();
    println!(
        "time: {:.3} ms median of {} (best {:.3} ms); {:.2} GB/s, {:.3} TFLOP/s",
        t * 1e3,
        timing.samples.len(),
        timing.min() * 1e3,
        sparse::bytes(&p) / t / 1e9,
        sparse::flops(&p) / t / 1e12
    );

    let tols = check::tolerances(DType::Bf16, backend.name());
    let reference = CpuBackend::with_options(CpuOptions { threads: Some(1), isa: None })?;
    let want = exec::run_fp8(&reference, &p)?;
    let mut failures = check::against_cpu_run(
        backend.name(),
        got.bitwise_eq(&want),
        (&got.out, &got.lse),
        (&want.out, &want.lse),
        tols,
    );

    let rows = check::sample_rows_of(p.batch, p.s_q, p.h_q, args.check_rows);
    failures.extend(check::sampled_rows(&rows, (p.s_q, p.h_q), (&got.out, &got.lse), tols, |i, t, h| {
        sparse::reference_row(&p, i, t, h)
    })?);

    if let Some(dir) = &args.save {
        let opts = sparse::save(dir, &p, &got)?;
        println!(
            "saved to {}/; reproduce with: flashmla decode --fp8-cache {opts} --out out.npy --lse lse.npy",
            dir.display()
        );
    }
    if failures.is_empty() {
        println!("PASS");
        Ok(())
    } else {
        Err(cli_err!("check FAILED: {}", failures.join("; ")))
    }
}

/// Writes the problem as `flashmla decode` inputs (float32 values that round back to the same elements) plus the
/// backend's outputs, and prints the command that reproduces them.
fn save_problem(dir: &Path, p: &HostProblem, got: &HostOutputs) -> CliResult {
    std::fs::create_dir_all(dir).map_err(|e| cli_err!("{}: cannot create: {e}", dir.display()))?;
    let widen = |e: &mla_cpu::problem::Elems, descale: f32| -> Vec<f32> {
        let s = if p.dtype == DType::E4M3 { descale } else { 1.0 };
        (0..e.len()).map(|k| e.get(p.dtype, k) * s).collect()
    };
    let f = |name: &str| dir.join(name);
    npy::write_f32(&f("q.npy"), &[p.batch, p.s_q, p.h_q, HEAD_DIM_K], &widen(&p.q, p.descale_q))?;
    npy::write_f32(&f("kv.npy"), &[p.num_blocks, p.page_size, p.h_kv, HEAD_DIM_K], &widen(&p.kv, p.descale_k))?;
    npy::write_i32(&f("block_table.npy"), &[p.batch, p.max_blocks_per_seq], &p.block_table)?;
    npy::write_i32(&f("seqlens.npy"), &[p.batch], &p.seqlens)?;
    npy::write_f32(&f("out.npy"), &[p.batch, p.s_q, p.h_q, HEAD_DIM_V], &got.out)?;
    npy::write_f32(&f("lse.npy"), &[p.batch, p.h_q, p.s_q], &got.lse)?;
    let d = dir.display();
    let descales = if p.dtype == DType::E4M3 {
        format!(" --descale-q {} --descale-k {}", p.descale_q, p.descale_k)
    } else {
        String::new()
    };
    println!(
        "saved to {d}/; reproduce with: flashmla decode --dtype {}{descales}{} --q {d}/q.npy --kv-cache {d}/kv.npy \\\n  \
         --block-table {d}/block_table.npy --seqlens {d}/seqlens.npy --out out.npy --lse lse.npy",
        p.dtype,
        if p.causal { " --causal" } else { "" },
    );
    Ok(())
}
