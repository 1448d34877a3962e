//! The measurement: inputs on the device, each call timed with CUDA events, and the host's own time per call.

use std::ffi::c_void;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, sys};
use mla_core::dtype::{f32_to_bf16, f32_to_e4m3, f32_to_f16};
use mla_core::{
    DType, DecodeArgs, DecodeShape, Device, HEAD_DIM_K, HEAD_DIM_V, MetadataArgs, MlaBackend, ScalarType, Stream,
    TensorDesc, Workspace,
};

use super::Options;
use super::grid::Rng;
use crate::args::{CliError, CliResult};
use crate::cli_err;

/// Tokens per KV page (the Hopper kernels' only page size).
const PAGE: usize = 64;
/// Block-table filler past a request's last page (upstream's test value): reading it would be a bug.
const BT_GARBAGE: i32 = 2_147_480_000;
/// Bytes of each random pattern (one tiled over the caches, one over the queries).
const PATTERN_BYTES: usize = 16 << 20;
/// Bytes copied by the copy-bandwidth measurement.
pub const COPY_BYTES: usize = 2 << 30;
/// At most this many calls are timed for the host cost: well inside CUDA's launch queue (1024 pending launches;
/// a decode call is two), so the host never waits for the GPU.
const HOST_TIMING_MAX_CALLS: usize = 200;
/// FP8 descales (any finite values: they only scale the logits and the output).
const DESCALE_Q: f32 = 0.5;
const DESCALE_K: f32 = 0.25;

fn cuda(e: DriverError) -> CliError {
    cli_err!("CUDA driver error: {e:?}")
}

/// `PATTERN_BYTES` of N(0, 1) values in `dtype` (E4M3: N(0, 8) codes), tiled over caches and queries.
pub fn random_pattern(rng: &mut Rng, dtype: DType) -> Vec<u8> {
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

/// The device: one context, its default (null) stream, which is also the stream the backend is given
/// ([`Stream::DEFAULT`]), so allocations, copies, events and kernels are ordered.
pub struct Dev {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    device: Device,
    sync_each: bool,
}

impl Dev {
    pub fn new(ordinal: i32, sync_each: bool) -> CliResult<Dev> {
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
    pub fn copy_gbs(&self) -> CliResult<f64> {
        let src = self.zeros(COPY_BYTES)?;
        let mut dst = self.zeros(COPY_BYTES)?;
        let (ms, _) = self.time_ms(10, |_| self.stream.memcpy_dtod(&src, &mut dst).map_err(cuda))?;
        Ok(2.0 * COPY_BYTES as f64 / (ms * 1e-3) / 1e9)
    }
}

/// A batch's paged KV caches (`sets` copies) and the tensors every head count shares.
pub struct Caches {
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
    pub fn new(
        dev: &Dev,
        rng: &mut Rng,
        dtype: DType,
        seqlens: Vec<i32>,
        sets: usize,
        pattern: &[u8],
    ) -> CliResult<Self> {
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
}

/// One measured configuration.
pub struct Measured {
    pub ms: f64,
    pub min_ms: f64,
    pub sched_ms: f64,
    /// Host µs per `decode` / `get_mla_metadata` call ([`Dev::host_us`]).
    pub host_us: f64,
    pub sched_host_us: f64,
    /// `num_splits[b]`: the total number of (request, part) pieces the scheduler cut the batch into.
    pub splits: usize,
}

/// Times the scheduler step and the decode call for `h_q` query heads and `s_q` tokens over `caches`.
#[allow(clippy::too_many_arguments)]
pub fn measure(
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
