//! `flashmla bench --backend hopper`: upstream FlashMLA's decode benchmark on the Hopper kernels, against
//! upstream's own figures on the same kind of device (H100 or H200, [`crate::anchors`]; `--anchors` picks).
//!
//! | grid | configurations (per dtype) |
//! |---|---|
//! | `upstream` (default) | b = 128, h_kv = 1, s_k ∈ {4096, 8192, 16384} × {fixed, varlen}, h_q ∈ {16, 32, 64, 128}, s_q ∈ {1, 2} |
//! | `small` | issue 6's small and imbalanced batches: b = 4 with lengths [4641, 45118, 1730, 1696], s_q = 4, h_q = 16; b ∈ {1, 2, 4, 8} × s_k ∈ {1k, 4k, 16k, 64k}, s_q = 1, h_q = 128 |
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

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, sys};
use mla_core::dtype::{f32_to_bf16, f32_to_e4m3, f32_to_f16};
use mla_core::{
    DType, DecodeArgs, DecodeShape, Device, HEAD_DIM_K, HEAD_DIM_V, MetadataArgs, MlaBackend, ScalarType, Stream,
    TensorDesc, Workspace,
};

use serde::Serialize;

use crate::anchors::{ANCHOR_BATCH, AnchorSet, Which};
use crate::args::{BenchArgs, CliError, CliResult};
use crate::cli_err;
use crate::plot::{self, Plot, Point};
use crate::progress::Progress;
use crate::report::{pct, round, save_json};

/// Tokens per KV page (the Hopper kernels' only page size).
const PAGE: usize = 64;
/// Block-table filler past a request's last page (upstream's test value): reading it would be a bug.
const BT_GARBAGE: i32 = 2_147_480_000;
/// Bytes of each random pattern (one tiled over the caches, one over the queries).
const PATTERN_BYTES: usize = 16 << 20;
/// Bytes copied by the copy-bandwidth measurement.
const COPY_BYTES: usize = 2 << 30;
/// At most this many calls are timed for the host cost: well inside CUDA's launch queue (1024 pending launches;
/// a decode call is two), so the host never waits for the GPU.
const HOST_TIMING_MAX_CALLS: usize = 200;
/// FP8 descales (any finite values: they only scale the logits and the output).
const DESCALE_Q: f32 = 0.5;
const DESCALE_K: f32 = 0.25;

fn cuda(e: DriverError) -> CliError {
    cli_err!("CUDA driver error: {e:?}")
}

/// Which configurations to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grid {
    Upstream,
    Small,
}

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
    let iters: usize = args.iters.unwrap_or(30);
    let sets: usize = args.sets.unwrap_or(2);
    let opts = Options {
        grid,
        dtypes,
        batch: batch.unwrap_or(ANCHOR_BATCH),
        sks: sks.clone().unwrap_or_else(|| vec![4096, 8192, 16384]),
        hqs: hqs.clone().unwrap_or_else(|| vec![16, 32, 64, 128]),
        sqs: sqs.clone().unwrap_or_else(|| vec![1, 2]),
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

/// xorshift64* with Box-Muller normals: seedable, fast, good enough for benchmark inputs. Kept rather than
/// `rand`/`rand_distr`: the varlen lengths and page permutations of a seed are part of the recorded results
/// (docs/log/performance.md, docs/bench/), and another generator would draw other batches for the same `--seed`.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Spread small seeds over the state (0 would be a fixed point).
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9).max(1))
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The lengths of one upstream-grid configuration: `s_k` each, or `max(N(s_k, s_k/2), 2)` (upstream's varlen
/// draw). The same for every dtype of a run.
fn upstream_lengths(batch: usize, s_k: usize, varlen: bool, seed: u64) -> Vec<i32> {
    let mut rng = Rng::new(seed ^ (s_k as u64).rotate_left(32));
    (0..batch)
        .map(|_| if varlen { ((s_k as f64 + rng.normal() * s_k as f64 / 2.0) as i32).max(2) } else { s_k as i32 })
        .collect()
}

/// Issue 6's small and imbalanced batches: (lengths, s_q, h_q).
fn small_configs() -> Vec<(Vec<i32>, usize, usize)> {
    let mut configs = vec![(vec![4641, 45118, 1730, 1696], 4, 16)];
    for b in [1usize, 2, 4, 8] {
        for s_k in [1024, 4096, 16384, 65536] {
            configs.push((vec![s_k; b], 1, 128));
        }
    }
    configs
}

/// `PATTERN_BYTES` of N(0, 1) values in `dtype` (E4M3: N(0, 8) codes), tiled over caches and queries.
fn random_pattern(rng: &mut Rng, dtype: DType) -> Vec<u8> {
    let n = PATTERN_BYTES / dtype.size_bytes();
    let mut out = Vec::with_capacity(PATTERN_BYTES);
    for _ in 0..n {
        let x = rng.normal() as f32;
        match dtype {
            DType::Bf16 => out.extend_from_slice(&f32_to_bf16(x).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f32_to_f16(x).to_le_bytes()),
            DType::E4M3 => out.push(f32_to_e4m3(x * 8.0)),
        }
    }
    out
}

/// Upstream's FLOPs and bytes of one decode (h_kv = 1).
fn flops_bytes(dtype: DType, total_seqlen: usize, batch: usize, s_q: usize, h_q: usize) -> (f64, f64) {
    let flops = 2.0 * (s_q * total_seqlen * h_q) as f64 * (HEAD_DIM_K + HEAD_DIM_V) as f64;
    let rows = batch * s_q * h_q;
    let bytes = (dtype.size_bytes() * (total_seqlen * HEAD_DIM_K + rows * HEAD_DIM_K) + 2 * rows * HEAD_DIM_V) as f64;
    (flops, bytes)
}

/// FLOP per byte at which a row's time is taken to turn from its bytes to its FLOPs, for the estimate of the time
/// left only (about an H100's or H200's dense BF16 peak over its bandwidth).
const NOMINAL_RIDGE: f64 = 250.0;

/// Each configuration's weight in the estimate of the time left, in run order: its bytes, or its FLOPs over
/// [`NOMINAL_RIDGE`] where more.
fn costs(opts: &Options) -> Vec<f64> {
    let cost = |dtype, total, b, s_q, h_q| {
        let (flops, bytes) = flops_bytes(dtype, total, b, s_q, h_q);
        bytes.max(flops / NOMINAL_RIDGE)
    };
    let mut out = Vec::new();
    for &dtype in &opts.dtypes {
        match opts.grid {
            Grid::Upstream => {
                for &s_k in &opts.sks {
                    for _ in &opts.modes {
                        for &h_q in &opts.hqs {
                            for &s_q in &opts.sqs {
                                out.push(cost(dtype, opts.batch * s_k, opts.batch, s_q, h_q));
                            }
                        }
                    }
                }
            }
            Grid::Small => {
                for (seqlens, s_q, h_q) in small_configs() {
                    let total = seqlens.iter().map(|&s| s as usize).sum();
                    out.push(cost(dtype, total, seqlens.len(), s_q, h_q));
                }
            }
        }
    }
    out
}

/// The device: one context, its default (null) stream, which is also the stream the backend is given
/// ([`Stream::DEFAULT`]), so allocations, copies, events and kernels are ordered.
struct Dev {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    device: Device,
    sync_each: bool,
}

impl Dev {
    fn new(ordinal: i32, sync_each: bool) -> CliResult<Dev> {
        let ctx = CudaContext::new(ordinal as usize).map_err(cuda)?;
        // SAFETY: right after retaining the (primary) context, before this handle allocates anything; all work
        // here is ordered on one stream, so cudarc's per-allocation events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Dev { ctx, stream, device: Device::Cuda(ordinal), sync_each })
    }

    fn upload<T: DeviceRepr>(&self, v: &[T]) -> CliResult<CudaSlice<T>> {
        self.stream.clone_htod(v).map_err(cuda)
    }

    /// `bytes` (at least 256) filled with repetitions of `pattern` (non-empty), copied in pieces of up to
    /// [`PATTERN_BYTES`] (so multi-GB caches stay cheap).
    fn filled(&self, bytes: usize, pattern: &[u8]) -> CliResult<CudaSlice<u8>> {
        let n = bytes.max(256);
        let cycled: Vec<u8>;
        let piece = if pattern.len() >= PATTERN_BYTES.min(n) {
            pattern
        } else {
            cycled = pattern.iter().copied().cycle().take(PATTERN_BYTES.min(n)).collect();
            &cycled
        };
        let mut slice = self.stream.alloc_zeros::<u8>(n).map_err(cuda)?;
        let mut off = 0;
        while off < n {
            let len = piece.len().min(n - off);
            let mut view = slice.slice_mut(off..off + len);
            self.stream.memcpy_htod(&piece[..len], &mut view).map_err(cuda)?;
            off += len;
        }
        Ok(slice)
    }

    fn zeros(&self, bytes: usize) -> CliResult<CudaSlice<u8>> {
        self.stream.alloc_zeros::<u8>(bytes.max(256)).map_err(cuda)
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> *mut c_void {
        let (p, _sync) = s.device_ptr(&self.stream);
        p as usize as *mut c_void
    }

    /// A contiguous descriptor over `s`.
    fn desc<'s, T>(&self, s: &'s CudaSlice<T>, dtype: ScalarType, shape: &[usize]) -> CliResult<TensorDesc<'s>> {
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // SAFETY: every caller allocates `s` on this device for (at least) the shape's elements of `dtype`, and the
        // descriptor borrows `s`, so it cannot outlive the allocation.
        Ok(unsafe { TensorDesc::from_raw_contiguous(self.ptr(s), dtype, &shape, self.device) }?)
    }

    /// Calls `f(i)` (which enqueues work on the default stream) `iters` times after as many warm-up calls (at
    /// least 3), each between two CUDA events; returns (median, minimum) in ms.
    fn time_ms(&self, iters: usize, mut f: impl FnMut(usize) -> CliResult) -> CliResult<(f64, f64)> {
        // As many warm-up calls as timed ones: the first configuration otherwise runs on idle clocks.
        for i in 0..iters.max(3) {
            f(i)?;
        }
        let event = || self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda);
        let mut times = Vec::with_capacity(iters);
        if self.sync_each {
            let (start, end) = (event()?, event()?);
            for i in 0..iters {
                start.record(&self.stream).map_err(cuda)?;
                f(i)?;
                end.record(&self.stream).map_err(cuda)?;
                times.push(start.elapsed_ms(&end).map_err(cuda)? as f64);
            }
        } else {
            let events: Vec<(CudaEvent, CudaEvent)> =
                (0..iters).map(|_| Ok((event()?, event()?))).collect::<CliResult<_>>()?;
            for (i, (start, end)) in events.iter().enumerate() {
                start.record(&self.stream).map_err(cuda)?;
                f(i)?;
                end.record(&self.stream).map_err(cuda)?;
            }
            self.stream.synchronize().map_err(cuda)?;
            for (start, end) in &events {
                times.push(start.elapsed_ms(end).map_err(cuda)? as f64);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok((times[times.len() / 2], times[0]))
    }

    /// The host's time per call of `f(i)` (which enqueues work without waiting), µs: `iters` calls back to back,
    /// then one synchronisation outside the clock. With fewer calls than CUDA's launch queue holds, the queue never
    /// fills, so this is the library's host cost per call (validation, tensor maps, launches), the figure a Rust
    /// host pays per layer.
    fn host_us(&self, iters: usize, mut f: impl FnMut(usize) -> CliResult) -> CliResult<f64> {
        let n = iters.clamp(1, HOST_TIMING_MAX_CALLS);
        let t0 = Instant::now();
        for i in 0..n {
            f(i)?;
        }
        let us = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
        self.stream.synchronize().map_err(cuda)?;
        Ok(us)
    }

    /// Device-to-device copy bandwidth, GB/s (read + write counted), median of 10 copies of 2 GiB.
    fn copy_gbs(&self) -> CliResult<f64> {
        let src = self.zeros(COPY_BYTES)?;
        let mut dst = self.zeros(COPY_BYTES)?;
        let (ms, _) = self.time_ms(10, |_| self.stream.memcpy_dtod(&src, &mut dst).map_err(cuda))?;
        Ok(2.0 * COPY_BYTES as f64 / (ms * 1e-3) / 1e9)
    }
}

/// A batch's paged KV caches (`sets` copies) and the tensors every head count shares.
struct Caches {
    seqlens: Vec<i32>,
    num_blocks: usize,
    max_blocks: usize,
    caches: Vec<CudaSlice<u8>>,
    block_table: CudaSlice<i32>,
    seqlens_dev: CudaSlice<i32>,
    descales: CudaSlice<f32>,
}

impl Caches {
    /// Pages of each request at random positions of the cache; block-table entries past a request's last page
    /// hold [`BT_GARBAGE`].
    fn new(dev: &Dev, rng: &mut Rng, dtype: DType, seqlens: Vec<i32>, sets: usize, pattern: &[u8]) -> CliResult<Self> {
        let b = seqlens.len();
        let blocks: Vec<usize> = seqlens.iter().map(|&s| (s.max(0) as usize).div_ceil(PAGE)).collect();
        let num_blocks: usize = blocks.iter().sum();
        let max_blocks = blocks.iter().copied().max().unwrap_or(0).max(1);
        let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..num_blocks).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let mut bt = vec![BT_GARBAGE; b * max_blocks];
        let mut pages = perm.into_iter();
        for (i, &nb) in blocks.iter().enumerate() {
            for slot in &mut bt[i * max_blocks..i * max_blocks + nb] {
                *slot = pages.next().expect("one page per block");
            }
        }
        let cache_bytes = num_blocks * PAGE * HEAD_DIM_K * dtype.size_bytes();
        Ok(Caches {
            num_blocks,
            max_blocks,
            caches: (0..sets).map(|_| dev.filled(cache_bytes, pattern)).collect::<CliResult<_>>()?,
            block_table: dev.upload(&bt)?,
            seqlens_dev: dev.upload(&seqlens)?,
            descales: dev.upload(&[DESCALE_Q, DESCALE_K])?,
            seqlens,
        })
    }

    fn total_seqlen(&self) -> usize {
        self.seqlens.iter().map(|&s| s.max(0) as usize).sum()
    }
}

/// One measured configuration.
struct Measured {
    ms: f64,
    min_ms: f64,
    sched_ms: f64,
    /// Host µs per `decode` / `get_mla_metadata` call ([`Dev::host_us`]).
    host_us: f64,
    sched_host_us: f64,
    /// `num_splits[b]`: the total number of (request, part) pieces the scheduler cut the batch into.
    splits: usize,
}

/// Times the scheduler step and the decode call for `h_q` query heads and `s_q` tokens over `caches`.
#[allow(clippy::too_many_arguments)]
fn measure(
    be: &dyn MlaBackend,
    dev: &Dev,
    caches: &Caches,
    dtype: DType,
    h_q: usize,
    s_q: usize,
    causal: bool,
    opts: &Options,
    q_pattern: &[u8],
) -> CliResult<Measured> {
    let b = caches.seqlens.len();
    let elt = dtype.size_bytes();
    let shape = DecodeShape { batch: b, s_q, h_q, h_kv: 1, dtype };
    let parts = be.num_sm_parts(s_q * h_q, 1);
    let qs: Vec<CudaSlice<u8>> =
        (0..opts.sets).map(|_| dev.filled(b * s_q * h_q * HEAD_DIM_K * elt, q_pattern)).collect::<CliResult<_>>()?;
    let workspace = dev.zeros(be.workspace_size(&shape)?)?;
    let out = dev.zeros(b * s_q * h_q * HEAD_DIM_V * 2)?;
    let lse = dev.zeros(b * s_q * h_q * 4)?;
    let metadata = dev.upload(&vec![0i32; parts * 8])?;
    let num_splits = dev.upload(&vec![0i32; b + 1])?;
    let i32t = ScalarType::I32;
    let md = MetadataArgs {
        cache_seqlens: dev.desc(&caches.seqlens_dev, i32t, &[b])?,
        q_seq_per_hk: s_q * h_q,
        h_kv: 1,
        tile_scheduler_metadata: dev.desc(&metadata, i32t, &[parts, 8])?,
        num_splits: dev.desc(&num_splits, i32t, &[b + 1])?,
    };
    let (sched_ms, _) = dev.time_ms(opts.iters, |_| Ok(be.get_mla_metadata(&md, Stream::DEFAULT)?))?;
    let sched_host_us = dev.host_us(opts.iters, |_| Ok(be.get_mla_metadata(&md, Stream::DEFAULT)?))?;
    let splits = dev.stream.clone_dtoh(&num_splits).map_err(cuda)?[b].max(0) as usize;
    let fp8 = dtype == DType::E4M3;
    // `descales` holds [descale_q, descale_k]; each view is one element of it.
    let descale = |i: usize| -> CliResult<Option<TensorDesc<'_>>> {
        if !fp8 {
            return Ok(None);
        }
        let p = dev.ptr(&caches.descales).cast::<f32>().wrapping_add(i).cast();
        // SAFETY: element `i` (0 or 1) of the two-float `descales` buffer, which outlives every use of `args`.
        Ok(Some(unsafe { TensorDesc::from_raw_contiguous(p, ScalarType::F32, &[1], dev.device) }?))
    };
    let args: Vec<DecodeArgs> = (0..opts.sets)
        .map(|set| {
            Ok(DecodeArgs {
                q: dev.desc(&qs[set], dtype.scalar(), &[b, s_q, h_q, HEAD_DIM_K])?,
                k_cache: dev.desc(&caches.caches[set], dtype.scalar(), &[caches.num_blocks, PAGE, 1, HEAD_DIM_K])?,
                block_table: dev.desc(&caches.block_table, i32t, &[b, caches.max_blocks])?,
                cache_seqlens: md.cache_seqlens,
                head_dim_v: HEAD_DIM_V,
                tile_scheduler_metadata: md.tile_scheduler_metadata,
                num_splits: md.num_splits,
                softmax_scale: None,
                causal,
                descale_q: descale(0)?,
                descale_k: descale(1)?,
                out: dev.desc(&out, dtype.out_dtype(), &[b, s_q, h_q, HEAD_DIM_V])?,
                lse: dev.desc(&lse, ScalarType::F32, &[b, h_q, s_q])?,
            })
        })
        .collect::<CliResult<_>>()?;
    // SAFETY: a device buffer of `workspace.len()` bytes that outlives the timing loop and nothing else uses.
    let ws = unsafe { Workspace::from_raw(dev.ptr(&workspace), workspace.len(), dev.device) };
    let (ms, min_ms) = dev.time_ms(opts.iters, |i| Ok(be.decode(&args[i % opts.sets], ws, Stream::DEFAULT)?))?;
    let host_us = dev.host_us(opts.iters, |i| Ok(be.decode(&args[i % opts.sets], ws, Stream::DEFAULT)?))?;
    Ok(Measured { ms, min_ms, sched_ms, host_us, sched_host_us, splits })
}

/// One row of the report.
struct Row {
    grid: Grid,
    dtype: DType,
    batch: usize,
    h_q: usize,
    s_q: usize,
    /// Upstream grid: the nominal s_k; small grid: the common length, if all are equal.
    s_k: Option<usize>,
    /// `fixed`, `varlen`, or (small grid) `list`.
    mode: &'static str,
    /// Small grid only: the lengths.
    seqlens: Option<Vec<i32>>,
    total_seqlen: usize,
    causal: bool,
    m: Measured,
    tflops: f64,
    gbs: f64,
    anchor_ms: Option<f64>,
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

fn grid_name(g: Grid) -> &'static str {
    if g == Grid::Small { "small" } else { "upstream" }
}

/// The whole run as JSON: device, ceiling, anchors, options, one object per row.
fn write_json(
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
fn draw_plot(path: &Path, device: &str, copy_gbs: Option<f64>, anchors: &AnchorSet, rows: &[Row]) -> CliResult {
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

fn upstream_header() {
    println!(
        "{:<5} {:>6} {:>4} {:>3} {:<6} {:>3} {:>9} {:>8} {:>8} {:>9} {:>7} {:>8}",
        "dtype", "s_k", "h_q", "s_q", "mode", "cau", "ms", "TFLOPS", "GB/s", "anchor", "ratio", "sched_us"
    );
}

fn small_header() {
    println!(
        "{:<5} {:>2} {:>3} {:>4} {:<28} {:>6} {:>9} {:>8} {:>8} {:>8} {:>10}",
        "dtype", "b", "s_q", "h_q", "lengths", "splits", "us", "GB/s", "sched_us", "host_us", "sched_host"
    );
}

fn lengths_label(seqlens: &[i32]) -> String {
    if seqlens.iter().all(|&s| s == seqlens[0]) {
        format!("{} x {}", seqlens.len(), seqlens[0])
    } else {
        format!("{seqlens:?}")
    }
}

/// `--dry-run`: the configurations and their anchors, without a device.
fn dry_run(opts: &Options, anchors: &AnchorSet) {
    let mut n = 0;
    match opts.grid {
        Grid::Upstream => {
            println!(
                "{:<5} {:>6} {:>4} {:>3} {:<6} {:>3} {:>5} {:>9}",
                "dtype", "s_k", "h_q", "s_q", "mode", "cau", "b", "anchor"
            );
            for &dtype in &opts.dtypes {
                for &s_k in &opts.sks {
                    for &varlen in &opts.modes {
                        for &h_q in &opts.hqs {
                            for &s_q in &opts.sqs {
                                let causal = opts.causal(dtype, anchors);
                                let a = anchors.anchor(dtype, opts.batch, s_k, h_q, s_q, varlen, causal);
                                println!(
                                    "{:<5} {:>6} {:>4} {:>3} {:<6} {:>3} {:>5} {:>9}",
                                    dtype.name(),
                                    s_k,
                                    h_q,
                                    s_q,
                                    if varlen { "varlen" } else { "fixed" },
                                    causal as u8,
                                    opts.batch,
                                    a.map_or("-".into(), |a| format!("{a:.3}"))
                                );
                                n += 1;
                            }
                        }
                    }
                }
            }
        }
        Grid::Small => {
            println!("{:<5} {:>2} {:>3} {:>4} {:<28} {:>3}", "dtype", "b", "s_q", "h_q", "lengths", "cau");
            for &dtype in &opts.dtypes {
                for (seqlens, s_q, h_q) in small_configs() {
                    let label = lengths_label(&seqlens);
                    let causal = opts.causal(dtype, anchors) as u8;
                    println!("{:<5} {:>2} {:>3} {:>4} {label:<28} {causal:>3}", dtype.name(), seqlens.len(), s_q, h_q);
                    n += 1;
                }
            }
        }
    }
    println!(
        "dry run: {n} configurations, {} launches each after as many warm-ups, {} input sets",
        opts.iters, opts.sets
    );
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
    let dev = Dev::new(opts.ordinal, opts.sync_each)?;
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
    let copy_gbs = if opts.ceilings { Some(dev.copy_gbs()?) } else { None };
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
        Grid::Upstream => {
            println!(
                "b = {}, h_kv = 1: whole decode call (split + combine), median of {} launches rotating {} input \
                 sets ({timing}); seed {}",
                opts.batch, opts.iters, opts.sets, opts.seed
            );
            upstream_header();
            for &dtype in &opts.dtypes {
                let causal = opts.causal(dtype, anchors);
                let (pattern, q_pattern) = (random_pattern(&mut rng, dtype), random_pattern(&mut rng, dtype));
                for &s_k in &opts.sks {
                    for &varlen in &opts.modes {
                        let seqlens = upstream_lengths(opts.batch, s_k, varlen, opts.seed);
                        let caches = Caches::new(&dev, &mut rng, dtype, seqlens, opts.sets, &pattern)?;
                        let total = caches.total_seqlen();
                        for &h_q in &opts.hqs {
                            for &s_q in &opts.sqs {
                                let m = measure(be, &dev, &caches, dtype, h_q, s_q, causal, &opts, &q_pattern)?;
                                let (flops, bytes) = flops_bytes(dtype, total, opts.batch, s_q, h_q);
                                let row = Row {
                                    grid: Grid::Upstream,
                                    dtype,
                                    batch: opts.batch,
                                    h_q,
                                    s_q,
                                    s_k: Some(s_k),
                                    mode: if varlen { "varlen" } else { "fixed" },
                                    seqlens: None,
                                    total_seqlen: total,
                                    causal,
                                    tflops: flops / (m.ms * 1e-3) / 1e12,
                                    gbs: bytes / (m.ms * 1e-3) / 1e9,
                                    anchor_ms: anchors.anchor(dtype, opts.batch, s_k, h_q, s_q, varlen, causal),
                                    m,
                                };
                                println!(
                                    "{:<5} {:>6} {:>4} {:>3} {:<6} {:>3} {:>9.4} {:>8.1} {:>8.0} {:>9} {:>7} {:>8.1}",
                                    dtype.name(),
                                    s_k,
                                    h_q,
                                    s_q,
                                    row.mode,
                                    causal as u8,
                                    row.m.ms,
                                    row.tflops,
                                    row.gbs,
                                    row.anchor_ms.map_or("-".into(), |a| format!("{a:.3}")),
                                    row.anchor_ms.map_or("-".into(), |a| format!("{:.3}", a / row.m.ms)),
                                    row.m.sched_ms * 1e3
                                );
                                rows.push(row);
                                save(&rows)?;
                                progress.step(&format!("{} s_k={s_k} h_q={h_q} s_q={s_q}", dtype.name()));
                            }
                        }
                    }
                }
            }
        }
        Grid::Small => {
            println!(
                "small batches: whole decode call (split + combine), median of {} launches rotating {} input sets \
                 ({timing})",
                opts.iters, opts.sets
            );
            small_header();
            for &dtype in &opts.dtypes {
                let causal = opts.causal(dtype, anchors);
                let (pattern, q_pattern) = (random_pattern(&mut rng, dtype), random_pattern(&mut rng, dtype));
                for (seqlens, s_q, h_q) in small_configs() {
                    let b = seqlens.len();
                    let label = lengths_label(&seqlens);
                    let caches = Caches::new(&dev, &mut rng, dtype, seqlens.clone(), opts.sets, &pattern)?;
                    let total = caches.total_seqlen();
                    let m = measure(be, &dev, &caches, dtype, h_q, s_q, causal, &opts, &q_pattern)?;
                    let (flops, bytes) = flops_bytes(dtype, total, b, s_q, h_q);
                    let uniform = seqlens.iter().all(|&s| s == seqlens[0]);
                    let row = Row {
                        grid: Grid::Small,
                        dtype,
                        batch: b,
                        h_q,
                        s_q,
                        s_k: uniform.then_some(seqlens[0] as usize),
                        mode: if uniform { "fixed" } else { "list" },
                        seqlens: Some(seqlens),
                        total_seqlen: total,
                        causal,
                        tflops: flops / (m.ms * 1e-3) / 1e12,
                        gbs: bytes / (m.ms * 1e-3) / 1e9,
                        anchor_ms: None,
                        m,
                    };
                    println!(
                        "{:<5} {:>2} {:>3} {:>4} {:<28} {:>6} {:>9.1} {:>8.0} {:>8.1} {:>8.2} {:>10.2}",
                        dtype.name(),
                        b,
                        s_q,
                        h_q,
                        label,
                        row.m.splits,
                        row.m.ms * 1e3,
                        row.gbs,
                        row.m.sched_ms * 1e3,
                        row.m.host_us,
                        row.m.sched_host_us
                    );
                    rows.push(row);
                    save(&rows)?;
                    progress.step(&format!("{} {label}", dtype.name()));
                }
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
mod tests {
    use super::*;

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
        let o =
            opts(&["--dtype", "bf16,fp16", "--seqlen", "4096", "--h-q", "16,128", "--s-q", "1", "--varlen"]).unwrap();
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
        let o =
            opts(&["--dtype", "bf16", "--sk", "4096,8192", "--varlen", "fixed", "--h-q", "16", "--s-q", "1"]).unwrap();
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
}
