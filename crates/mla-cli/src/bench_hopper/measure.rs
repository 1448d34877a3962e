//! The measurement: inputs on the device, entering the backend through the safe views of `flashmla::cuda`; each
//! call timed with CUDA events (the median of `--iters`), and the host's own time per call.
//!
//! Everything runs on the legacy default stream of the device's primary context ([`Gpu::stream`], the stream
//! [`Stream::DEFAULT`] names): allocations, uploads, events and the backend's kernels are ordered on it, so the
//! events around a call time that call's kernels.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use flashmla::cuda::{DeviceTensor, DeviceTensorMut, DeviceWorkspace, Gpu, driver_error};
use mla_core::scheduler::METADATA_WORDS;
use mla_core::{DType, DecodeArgs, DecodeShape, HEAD_DIM_K, HEAD_DIM_V, MetadataArgs, MlaBackend, Stream};
use mla_cpu::problem::Elems;

use super::Options;
use super::grid::Rng;
use crate::args::CliResult;
use crate::exec_cuda::DeviceElems;

/// Tokens per KV page (the Hopper kernels' only page size).
const PAGE: usize = 64;
/// Block-table filler past a request's last page (upstream's test value): reading it would be a bug.
const BT_GARBAGE: i32 = 2_147_480_000;
/// Bytes of each random pattern (one tiled over the caches, one over the queries).
const PATTERN_BYTES: usize = 16 << 20;
/// E4M3 patterns hold N(0, 8) codes: N(0, 1) values over this descale.
const E4M3_PATTERN_DESCALE: f32 = 0.125;
/// Bytes copied by the copy-bandwidth measurement.
pub const COPY_BYTES: usize = 2 << 30;
/// Copies timed for the copy bandwidth (the median is taken).
const COPY_ITERS: usize = 10;
/// Fewest warm-up calls before the timed ones (otherwise as many as are timed).
const MIN_WARMUPS: usize = 3;
/// At most this many calls are timed for the host cost: well inside CUDA's launch queue (1024 pending launches;
/// a decode call is two), so the host never waits for the GPU.
const HOST_TIMING_MAX_CALLS: usize = 200;
/// FP8 descales (any finite values: they only scale the logits and the output).
const DESCALE_Q: f32 = 0.5;
const DESCALE_K: f32 = 0.25;

/// `PATTERN_BYTES` of N(0, 1) values in `dtype` (E4M3: N(0, 8) codes), tiled over caches and queries.
pub fn random_pattern(rng: &mut Rng, dtype: DType) -> Elems {
    let x: Vec<f32> = (0..PATTERN_BYTES / dtype.size_bytes()).map(|_| rng.normal() as f32).collect();
    Elems::encode(dtype, &x, E4M3_PATTERN_DESCALE)
}

/// `len` elements of `pattern` repeated, copied in pieces of the pattern's size (so a multi-GB cache uploads from
/// one [`PATTERN_BYTES`] host buffer).
fn tiled(stream: &Arc<CudaStream>, pattern: &Elems, len: usize) -> CliResult<DeviceElems> {
    fn tile<T: DeviceRepr + ValidAsZeroBits>(
        stream: &Arc<CudaStream>,
        pattern: &[T],
        len: usize,
    ) -> CliResult<CudaSlice<T>> {
        let mut out = stream.alloc_zeros::<T>(len).map_err(driver_error("cuMemAllocAsync"))?;
        for start in (0..len).step_by(pattern.len()) {
            let piece = &pattern[..pattern.len().min(len - start)];
            let mut dst = out.slice_mut(start..start + piece.len());
            stream.memcpy_htod(piece, &mut dst).map_err(driver_error("cuMemcpyHtoDAsync"))?;
        }
        Ok(out)
    }
    Ok(match pattern {
        Elems::U16(p) => DeviceElems::Bits16(tile(stream, p, len)?),
        Elems::U8(p) => DeviceElems::Bytes(tile(stream, p, len)?),
    })
}

/// The device side of a run: the backend, its GPU, and how calls are timed.
pub struct GpuBench<'a> {
    be: &'a dyn MlaBackend,
    gpu: Gpu,
    iters: usize,
    sets: usize,
    sync_each: bool,
}

impl<'a> GpuBench<'a> {
    /// Opens the device `be` runs on (`--device`) for the run `opts` describes.
    pub fn open(be: &'a dyn MlaBackend, opts: &Options) -> CliResult<Self> {
        let gpu = Gpu::open(opts.ordinal)?;
        Ok(GpuBench { be, gpu, iters: opts.iters, sets: opts.sets, sync_each: opts.sync_each })
    }

    /// Calls `f(i)` (which enqueues work on the default stream) `iters` times after as many warm-up calls (at
    /// least [`MIN_WARMUPS`]), each between two CUDA events; returns (median, minimum) in ms.
    fn time_ms(&self, iters: usize, mut f: impl FnMut(usize) -> CliResult) -> CliResult<(f64, f64)> {
        // As many warm-up calls as timed ones: the first configuration otherwise runs on idle clocks.
        for i in 0..iters.max(MIN_WARMUPS) {
            f(i)?;
        }
        let stream = self.gpu.stream();
        let event = || {
            let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
            self.gpu.context().new_event(timed).map_err(driver_error("cuEventCreate"))
        };
        let record = |e: &CudaEvent| e.record(stream).map_err(driver_error("cuEventRecord"));
        let elapsed = |start: &CudaEvent, end| start.elapsed_ms(end).map_err(driver_error("cuEventElapsedTime"));
        // The events are made before the first timed launch, so that making them is never inside a timed interval.
        let pairs = if self.sync_each { 1 } else { iters };
        let mut events = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            events.push((event()?, event()?));
        }
        let mut times = Vec::with_capacity(iters);
        if self.sync_each {
            // One pair, recorded again around every launch; `elapsed_ms` waits for the end event.
            let (start, end) = &events[0];
            for i in 0..iters {
                record(start)?;
                f(i)?;
                record(end)?;
                times.push(f64::from(elapsed(start, end)?));
            }
        } else {
            // A pair per launch, all queued before one synchronisation: the launches run back to back.
            for (i, (start, end)) in events.iter().enumerate() {
                record(start)?;
                f(i)?;
                record(end)?;
            }
            stream.synchronize().map_err(driver_error("cuStreamSynchronize"))?;
            for (start, end) in &events {
                times.push(f64::from(elapsed(start, end)?));
            }
        }
        times.sort_by(f64::total_cmp);
        Ok((times[times.len() / 2], times[0]))
    }

    /// The host's time per call of `f(i)` (which enqueues work without waiting), µs: `--iters` calls back to back
    /// (at most [`HOST_TIMING_MAX_CALLS`]), then one synchronisation outside the clock. With fewer calls than
    /// CUDA's launch queue holds, the queue never fills, so this is the library's host cost per call (validation,
    /// tensor maps, launches), the figure a Rust host pays per layer.
    fn host_us(&self, mut f: impl FnMut(usize) -> CliResult) -> CliResult<f64> {
        let n = self.iters.clamp(1, HOST_TIMING_MAX_CALLS);
        let t0 = Instant::now();
        for i in 0..n {
            f(i)?;
        }
        let us = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
        self.gpu.stream().synchronize().map_err(driver_error("cuStreamSynchronize"))?;
        Ok(us)
    }

    /// Device-to-device copy bandwidth, GB/s (read + write counted), median of [`COPY_ITERS`] copies of
    /// [`COPY_BYTES`].
    pub fn copy_gbs(&self) -> CliResult<f64> {
        let stream = self.gpu.stream();
        let alloc = driver_error("cuMemAllocAsync");
        let src = stream.alloc_zeros::<u8>(COPY_BYTES).map_err(&alloc)?;
        let mut dst = stream.alloc_zeros::<u8>(COPY_BYTES).map_err(&alloc)?;
        let copy = |_: usize| -> CliResult {
            Ok(stream.memcpy_dtod(&src, &mut dst).map_err(driver_error("cuMemcpyDtoDAsync"))?)
        };
        let (ms, _) = self.time_ms(COPY_ITERS, copy)?;
        Ok(2.0 * COPY_BYTES as f64 / (ms * 1e-3) / 1e9)
    }

    /// A batch's paged KV caches in `dtype` (`--sets` copies of `pattern`, tiled): the pages of each request at
    /// random positions of the cache; block-table entries past a request's last page hold [`BT_GARBAGE`].
    pub fn caches(&self, rng: &mut Rng, dtype: DType, seqlens: &[i32], pattern: &Elems) -> CliResult<Caches> {
        let blocks: Vec<usize> = seqlens.iter().map(|&s| (s.max(0) as usize).div_ceil(PAGE)).collect();
        let num_blocks: usize = blocks.iter().sum();
        let max_blocks = blocks.iter().copied().max().unwrap_or(0).max(1);
        let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..num_blocks).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let mut bt = vec![BT_GARBAGE; seqlens.len() * max_blocks];
        let mut pages = perm.into_iter();
        for (row, &nb) in bt.chunks_exact_mut(max_blocks).zip(&blocks) {
            for slot in &mut row[..nb] {
                *slot = pages.next().expect("one page per block");
            }
        }
        let stream = self.gpu.stream();
        let up = driver_error("cuMemcpyHtoDAsync");
        let cache_len = num_blocks * PAGE * HEAD_DIM_K;
        Ok(Caches {
            dtype,
            batch: seqlens.len(),
            num_blocks,
            max_blocks,
            caches: (0..self.sets).map(|_| tiled(stream, pattern, cache_len)).collect::<CliResult<_>>()?,
            block_table: stream.clone_htod(&bt).map_err(&up)?,
            seqlens: stream.clone_htod(seqlens).map_err(&up)?,
            descale_q: stream.clone_htod(&[DESCALE_Q]).map_err(&up)?,
            descale_k: stream.clone_htod(&[DESCALE_K]).map_err(&up)?,
        })
    }

    /// Times the scheduler step and the decode call for `h_q` query heads and `s_q` tokens over `caches`, with
    /// `--sets` query tensors (tiles of `q_pattern`) rotating with the caches.
    pub fn measure(
        &self,
        caches: &Caches,
        h_q: usize,
        s_q: usize,
        causal: bool,
        q_pattern: &Elems,
    ) -> CliResult<Measured> {
        let (be, stream) = (self.be, self.gpu.stream());
        let alloc = driver_error("cuMemAllocAsync");
        let (b, dtype) = (caches.batch, caches.dtype);
        let shape = DecodeShape { batch: b, s_q, h_q, h_kv: 1, dtype };
        let parts = be.num_sm_parts(s_q * h_q, 1);
        let q_shape = [b, s_q, h_q, HEAD_DIM_K];
        let q_len = q_shape.iter().product();
        let qs: Vec<DeviceElems> = (0..self.sets).map(|_| tiled(stream, q_pattern, q_len)).collect::<CliResult<_>>()?;
        // At least one byte: an empty allocation has no address.
        let mut workspace = stream.alloc_zeros::<u8>(be.workspace_size(&shape)?.max(1)).map_err(&alloc)?;
        let mut out = stream.alloc_zeros::<u16>(b * s_q * h_q * HEAD_DIM_V).map_err(&alloc)?;
        let mut lse = stream.alloc_zeros::<f32>(b * s_q * h_q).map_err(&alloc)?;
        let mut metadata = stream.alloc_zeros::<i32>(parts * METADATA_WORDS).map_err(&alloc)?;
        let mut num_splits = stream.alloc_zeros::<i32>(b + 1).map_err(&alloc)?;
        let seqlens = DeviceTensor::new(stream, &caches.seqlens, &[b])?;

        // The scheduler step, whose outputs the decode then reads (the writable views end with this block).
        let (sched_ms, sched_host_us) = {
            let metadata = DeviceTensorMut::new(stream, &mut metadata, &[parts, METADATA_WORDS])?;
            let num_splits = DeviceTensorMut::new(stream, &mut num_splits, &[b + 1])?;
            let md = MetadataArgs {
                cache_seqlens: seqlens.desc(),
                q_seq_per_hk: s_q * h_q,
                h_kv: 1,
                tile_scheduler_metadata: metadata.desc(),
                num_splits: num_splits.desc(),
            };
            let call = |_: usize| -> CliResult { Ok(be.get_mla_metadata(&md, Stream::DEFAULT)?) };
            (self.time_ms(self.iters, call)?.0, self.host_us(call)?)
        };
        let splits = stream.clone_dtoh(&num_splits).map_err(driver_error("cuMemcpyDtoHAsync"))?[b].max(0) as usize;

        let k_shape = [caches.num_blocks, PAGE, 1, HEAD_DIM_K];
        let q_views = qs.iter().map(|q| q.view(stream, dtype, &q_shape)).collect::<CliResult<Vec<_>>>()?;
        let k_views = caches.caches.iter().map(|k| k.view(stream, dtype, &k_shape)).collect::<CliResult<Vec<_>>>()?;
        let block_table = DeviceTensor::new(stream, &caches.block_table, &[b, caches.max_blocks])?;
        let metadata = DeviceTensor::new(stream, &metadata, &[parts, METADATA_WORDS])?;
        let num_splits = DeviceTensor::new(stream, &num_splits, &[b + 1])?;
        let descale_q = DeviceTensor::new(stream, &caches.descale_q, &[1])?;
        let descale_k = DeviceTensor::new(stream, &caches.descale_k, &[1])?;
        let out_shape = [b, s_q, h_q, HEAD_DIM_V];
        let out = DeviceTensorMut::with_dtype(stream, &mut out, dtype.out_dtype(), &out_shape, None)?;
        let lse = DeviceTensorMut::new(stream, &mut lse, &[b, h_q, s_q])?;
        let workspace = DeviceWorkspace::new(stream, &mut workspace)?;
        // The descales are read for e4m3 inputs only.
        let fp8 = dtype == DType::E4M3;
        // One call per input set; every set writes the same outputs and workspace.
        let args: Vec<DecodeArgs> = q_views
            .iter()
            .zip(&k_views)
            .map(|(q, k_cache)| DecodeArgs {
                q: q.desc(),
                k_cache: k_cache.desc(),
                block_table: block_table.desc(),
                cache_seqlens: seqlens.desc(),
                head_dim_v: HEAD_DIM_V,
                tile_scheduler_metadata: metadata.desc(),
                num_splits: num_splits.desc(),
                softmax_scale: None,
                causal,
                descale_q: fp8.then(|| descale_q.desc()),
                descale_k: fp8.then(|| descale_k.desc()),
                out: out.desc(),
                lse: lse.desc(),
            })
            .collect();
        let ws = workspace.workspace();
        let call = |i: usize| -> CliResult { Ok(be.decode(&args[i % args.len()], ws, Stream::DEFAULT)?) };
        let (ms, min_ms) = self.time_ms(self.iters, call)?;
        let host_us = self.host_us(call)?;
        Ok(Measured { ms, min_ms, sched_ms, host_us, sched_host_us, splits })
    }
}

/// A batch's paged KV caches (`--sets` copies) and the tensors every head count shares.
pub struct Caches {
    dtype: DType,
    batch: usize,
    num_blocks: usize,
    max_blocks: usize,
    caches: Vec<DeviceElems>,
    block_table: CudaSlice<i32>,
    seqlens: CudaSlice<i32>,
    descale_q: CudaSlice<f32>,
    descale_k: CudaSlice<f32>,
}

/// One measured configuration.
pub struct Measured {
    pub ms: f64,
    pub min_ms: f64,
    pub sched_ms: f64,
    /// Host µs per `decode` / `get_mla_metadata` call ([`GpuBench::host_us`]).
    pub host_us: f64,
    pub sched_host_us: f64,
    /// `num_splits[b]`: the total number of (request, part) pieces the scheduler cut the batch into.
    pub splits: usize,
}
