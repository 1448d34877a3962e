//! The CLI's CUDA data path: a host problem uploaded once, metadata and decode run on the device's default stream,
//! outputs downloaded after each call.
//!
//! ```text
//!   HostProblem ──upload──► q, kv, block_table, seqlens, descales (device)
//!   get_mla_metadata(seqlens) ──► metadata, num_splits (device, once)
//!   decode ──► out, lse (device) ──download──► HostOutputs
//! ```
//!
//! The buffers live in the device's primary context, the one the backend runs in, and enter the backend through
//! the safe views of `flashmla::cuda` (each checked against its buffer, for the legacy default stream that
//! [`Stream::DEFAULT`] names). Each decode is timed with CUDA events around the call ([`Gpu::time_ms`]).

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream};
use flashmla::cuda::{DeviceTensor, DeviceTensorMut, DeviceWorkspace, Gpu, driver_error};
use mla_core::dtype::{bf16_to_f32, f16_to_f32};
use mla_core::scheduler::METADATA_WORDS;
use mla_core::{DType, DecodeArgs, HEAD_DIM_K, HEAD_DIM_V, MetadataArgs, MlaBackend, ScalarType, Stream};
use mla_cpu::problem::{Elems, HostOutputs, HostProblem};

use crate::args::CliResult;

/// An input tensor's elements on the device, in their stored encoding.
pub enum DeviceElems {
    /// bf16 or fp16 bit patterns.
    Bits16(CudaSlice<u16>),
    /// e4m3 codes.
    Bytes(CudaSlice<u8>),
}

impl DeviceElems {
    /// A copy of `host` on `stream`'s device.
    pub fn upload(stream: &Arc<CudaStream>, host: &Elems) -> CliResult<DeviceElems> {
        let up = driver_error("cuMemcpyHtoDAsync");
        Ok(match host {
            Elems::U16(v) => DeviceElems::Bits16(stream.clone_htod(v).map_err(&up)?),
            Elems::U8(v) => DeviceElems::Bytes(stream.clone_htod(v).map_err(&up)?),
        })
    }

    /// A read-only row-major view as `dtype`, for work on `stream`.
    pub fn view<'a>(&'a self, stream: &'a CudaStream, dtype: DType, shape: &[usize]) -> CliResult<DeviceTensor<'a>> {
        Ok(match self {
            DeviceElems::Bits16(s) => DeviceTensor::with_dtype(stream, s, dtype.scalar(), shape, None)?,
            DeviceElems::Bytes(s) => DeviceTensor::with_dtype(stream, s, dtype.scalar(), shape, None)?,
        })
    }
}

/// A problem resident on one CUDA device, bound to one backend.
pub struct CudaRun<'a> {
    backend: &'a dyn MlaBackend,
    problem: &'a HostProblem,
    gpu: Gpu,
    q: DeviceElems,
    kv: DeviceElems,
    block_table: CudaSlice<i32>,
    seqlens: CudaSlice<i32>,
    descale_q: CudaSlice<f32>,
    descale_k: CudaSlice<f32>,
    metadata: CudaSlice<i32>,
    num_splits: CudaSlice<i32>,
    parts: usize,
    workspace: CudaSlice<u8>,
    /// Output bit patterns (bf16, or fp16 for fp16 inputs).
    out: CudaSlice<u16>,
    lse: CudaSlice<f32>,
}

impl<'a> CudaRun<'a> {
    /// Uploads `problem` to `cuda:ordinal`, allocates outputs and workspace, and runs the scheduler step there.
    pub fn new(backend: &'a dyn MlaBackend, problem: &'a HostProblem, ordinal: i32) -> CliResult<Self> {
        let gpu = Gpu::open(ordinal)?;
        let stream = gpu.stream();
        let (up, alloc) = (driver_error("cuMemcpyHtoDAsync"), driver_error("cuMemAllocAsync"));
        let sh = problem.shape();
        let p = problem;
        let parts = backend.num_sm_parts(sh.q_seq_per_hk(), sh.h_kv);
        // At least one byte: an empty allocation has no address.
        let workspace_bytes = backend.workspace_size(&sh)?.max(1);
        let mut run = CudaRun {
            backend,
            problem,
            q: DeviceElems::upload(stream, &p.q)?,
            kv: DeviceElems::upload(stream, &p.kv)?,
            block_table: stream.clone_htod(&p.block_table).map_err(&up)?,
            seqlens: stream.clone_htod(&p.seqlens).map_err(&up)?,
            descale_q: stream.clone_htod(&[p.descale_q]).map_err(&up)?,
            descale_k: stream.clone_htod(&[p.descale_k]).map_err(&up)?,
            metadata: stream.alloc_zeros(parts * METADATA_WORDS).map_err(&alloc)?,
            num_splits: stream.alloc_zeros(p.batch + 1).map_err(&alloc)?,
            parts,
            workspace: stream.alloc_zeros(workspace_bytes).map_err(&alloc)?,
            out: stream.alloc_zeros(p.batch * p.s_q * p.h_q * HEAD_DIM_V).map_err(&alloc)?,
            lse: stream.alloc_zeros(p.batch * p.h_q * p.s_q).map_err(&alloc)?,
            gpu,
        };
        run.metadata_step()?;
        Ok(run)
    }

    fn metadata_step(&mut self) -> CliResult {
        let p = self.problem;
        let sh = p.shape();
        let stream = self.gpu.stream();
        let seqlens = DeviceTensor::new(stream, &self.seqlens, &[p.batch])?;
        let metadata = DeviceTensorMut::new(stream, &mut self.metadata, &[self.parts, METADATA_WORDS])?;
        let num_splits = DeviceTensorMut::new(stream, &mut self.num_splits, &[p.batch + 1])?;
        let args = MetadataArgs {
            cache_seqlens: seqlens.desc(),
            q_seq_per_hk: sh.q_seq_per_hk(),
            h_kv: sh.h_kv,
            tile_scheduler_metadata: metadata.desc(),
            num_splits: num_splits.desc(),
        };
        self.backend.get_mla_metadata(&args, Stream::DEFAULT)?;
        // Waiting here makes a failed scheduler kernel this step's error rather than the first decode's.
        Ok(stream.synchronize().map_err(driver_error("cuStreamSynchronize"))?)
    }

    /// One decode call; returns the device time between CUDA events recorded around it.
    pub fn decode(&mut self) -> CliResult<Duration> {
        let p = self.problem;
        let (b, dt) = (p.batch, p.dtype);
        let stream = self.gpu.stream();
        let q = self.q.view(stream, dt, &[b, p.s_q, p.h_q, HEAD_DIM_K])?;
        let k_cache = self.kv.view(stream, dt, &[p.num_blocks, p.page_size, p.h_kv, HEAD_DIM_K])?;
        let block_table = DeviceTensor::new(stream, &self.block_table, &[b, p.max_blocks_per_seq])?;
        let seqlens = DeviceTensor::new(stream, &self.seqlens, &[b])?;
        let metadata = DeviceTensor::new(stream, &self.metadata, &[self.parts, METADATA_WORDS])?;
        let num_splits = DeviceTensor::new(stream, &self.num_splits, &[b + 1])?;
        let descale_q = DeviceTensor::new(stream, &self.descale_q, &[1])?;
        let descale_k = DeviceTensor::new(stream, &self.descale_k, &[1])?;
        let out_shape = [b, p.s_q, p.h_q, HEAD_DIM_V];
        let out = DeviceTensorMut::with_dtype(stream, &mut self.out, dt.out_dtype(), &out_shape, None)?;
        let lse = DeviceTensorMut::new(stream, &mut self.lse, &[b, p.h_q, p.s_q])?;
        let workspace = DeviceWorkspace::new(stream, &mut self.workspace)?;
        // The descales are read for e4m3 inputs only.
        let fp8 = dt == DType::E4M3;
        let args = DecodeArgs {
            q: q.desc(),
            k_cache: k_cache.desc(),
            block_table: block_table.desc(),
            cache_seqlens: seqlens.desc(),
            head_dim_v: HEAD_DIM_V,
            tile_scheduler_metadata: metadata.desc(),
            num_splits: num_splits.desc(),
            softmax_scale: p.softmax_scale,
            causal: p.causal,
            descale_q: fp8.then(|| descale_q.desc()),
            descale_k: fp8.then(|| descale_k.desc()),
            out: out.desc(),
            lse: lse.desc(),
        };
        let ((), ms) = self.gpu.time_ms(|| self.backend.decode(&args, workspace.workspace(), Stream::DEFAULT))?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }

    /// The outputs of the last decode, downloaded and widened.
    pub fn outputs(&self) -> CliResult<HostOutputs> {
        let down = driver_error("cuMemcpyDtoHAsync");
        let out = self.gpu.stream().clone_dtoh(&self.out).map_err(&down)?;
        let lse = self.gpu.stream().clone_dtoh(&self.lse).map_err(&down)?;
        let widen: fn(u16) -> f32 =
            if self.problem.dtype.out_dtype() == ScalarType::F16 { f16_to_f32 } else { bf16_to_f32 };
        Ok(HostOutputs { out: out.into_iter().map(widen).collect(), lse })
    }
}
