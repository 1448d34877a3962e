//! The CLI's CUDA data path: a host problem uploaded once, metadata and decode run on the device's default stream,
//! outputs downloaded after each call.
//!
//! ```text
//!   HostProblem ──upload──► q, kv, block_table, seqlens, descales (device)
//!   get_mla_metadata(seqlens) ──► metadata, num_splits (device, once)
//!   decode ──► out, lse (device) ──download──► HostOutputs
//! ```
//!
//! The backend and this module share the device's primary context (cudarc retains it), so the pointers allocated
//! here are valid for the backend's kernels. Each decode is timed with CUDA events around the call.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError, sys};
use mla_core::dtype::{bf16_to_f32, f16_to_f32};
use mla_core::{
    DType, DecodeArgs, Device, HEAD_DIM_K, HEAD_DIM_V, MetadataArgs, MlaBackend, ScalarType, Stream, TensorDesc,
    Workspace,
};
use mla_cpu::problem::{Elems, HostOutputs, HostProblem};

use crate::args::{CliError, CliResult};
use crate::cli_err;

fn cuda(e: DriverError) -> CliError {
    cli_err!("CUDA driver error: {e:?}")
}

/// Input elements on the device, in their stored encoding.
enum DevElems {
    U16(CudaSlice<u16>),
    U8(CudaSlice<u8>),
}

/// A problem resident on one CUDA device, bound to one backend.
pub struct CudaRun<'a> {
    backend: &'a dyn MlaBackend,
    problem: &'a HostProblem,
    device: Device,
    stream: Arc<CudaStream>,
    q: DevElems,
    kv: DevElems,
    block_table: CudaSlice<i32>,
    seqlens: CudaSlice<i32>,
    descales: CudaSlice<f32>,
    metadata: CudaSlice<i32>,
    num_splits: CudaSlice<i32>,
    parts: usize,
    workspace: CudaSlice<u8>,
    out: CudaSlice<u16>,
    lse: CudaSlice<f32>,
}

impl<'a> CudaRun<'a> {
    /// Uploads `problem` to `cuda:ordinal`, allocates outputs and workspace, and runs the scheduler step there.
    pub fn new(backend: &'a dyn MlaBackend, problem: &'a HostProblem, ordinal: i32) -> CliResult<Self> {
        let ctx = CudaContext::new(ordinal as usize).map_err(cuda)?;
        // SAFETY: called before this context handle allocates anything; this module orders all its work on one
        // stream, so cudarc's per-allocation events are not needed (and would interfere with the backend's own
        // stream handling).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let up16 = |v: &[u16]| stream.clone_htod(v).map_err(cuda);
        let up8 = |v: &[u8]| stream.clone_htod(v).map_err(cuda);
        let upload = |e: &Elems| -> CliResult<DevElems> {
            Ok(match e {
                Elems::U16(v) => DevElems::U16(up16(v)?),
                Elems::U8(v) => DevElems::U8(up8(v)?),
            })
        };
        let sh = problem.shape();
        let b = problem.batch;
        let parts = backend.num_sm_parts(sh.q_seq_per_hk(), sh.h_kv);
        let workspace_bytes = backend.workspace_size(&sh)?;
        let mut run = CudaRun {
            backend,
            problem,
            device: Device::Cuda(ordinal),
            q: upload(&problem.q)?,
            kv: upload(&problem.kv)?,
            block_table: stream.clone_htod(&problem.block_table).map_err(cuda)?,
            seqlens: stream.clone_htod(&problem.seqlens).map_err(cuda)?,
            descales: stream.clone_htod(&[problem.descale_q, problem.descale_k]).map_err(cuda)?,
            metadata: stream.alloc_zeros::<i32>(parts * 8).map_err(cuda)?,
            num_splits: stream.alloc_zeros::<i32>(b + 1).map_err(cuda)?,
            parts,
            workspace: stream.alloc_zeros::<u8>(workspace_bytes.max(1)).map_err(cuda)?,
            out: stream.alloc_zeros::<u16>(b * problem.s_q * problem.h_q * HEAD_DIM_V).map_err(cuda)?,
            lse: stream.alloc_zeros::<f32>(b * problem.h_q * problem.s_q).map_err(cuda)?,
            stream,
        };
        run.metadata_step()?;
        Ok(run)
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> *mut std::ffi::c_void {
        let (p, _sync) = s.device_ptr(&self.stream);
        p as usize as *mut std::ffi::c_void
    }

    fn elems_ptr(&self, e: &DevElems) -> *mut std::ffi::c_void {
        match e {
            DevElems::U16(s) => self.ptr(s),
            DevElems::U8(s) => self.ptr(s),
        }
    }

    /// A descriptor of `ptr`, which must point into one of this run's buffers (allocated for exactly these
    /// shapes); the descriptor borrows the run, so the buffers outlive it.
    fn desc(&self, ptr: *mut std::ffi::c_void, dtype: ScalarType, shape: &[usize]) -> CliResult<TensorDesc<'_>> {
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // SAFETY: every caller passes the address of one of this run's device buffers on `self.device`, allocated
        // with the element count of `shape`, and the descriptor cannot outlive `&self` (which owns the buffers).
        Ok(unsafe { TensorDesc::from_raw_contiguous(ptr, dtype, &shape, self.device) }?)
    }

    fn metadata_step(&mut self) -> CliResult {
        let p = self.problem;
        let sh = p.shape();
        let args = MetadataArgs {
            cache_seqlens: self.desc(self.ptr(&self.seqlens), ScalarType::I32, &[p.batch])?,
            q_seq_per_hk: sh.q_seq_per_hk(),
            h_kv: sh.h_kv,
            tile_scheduler_metadata: self.desc(self.ptr(&self.metadata), ScalarType::I32, &[self.parts, 8])?,
            num_splits: self.desc(self.ptr(&self.num_splits), ScalarType::I32, &[p.batch + 1])?,
        };
        self.backend.get_mla_metadata(&args, Stream::DEFAULT)?;
        self.stream.synchronize().map_err(cuda)
    }

    /// One decode call; returns the device time between CUDA events recorded around it.
    pub fn decode(&mut self) -> CliResult<Duration> {
        let p = self.problem;
        let (b, dt) = (p.batch, p.dtype);
        let descale = |i: usize| -> CliResult<Option<TensorDesc<'_>>> {
            if dt != DType::E4M3 {
                return Ok(None);
            }
            // `descales` holds [descale_q, descale_k]; each view is one element of it.
            let base = self.ptr(&self.descales).cast::<f32>();
            Ok(Some(self.desc(base.wrapping_add(i).cast(), ScalarType::F32, &[1])?))
        };
        let args = DecodeArgs {
            q: self.desc(self.elems_ptr(&self.q), dt.scalar(), &[b, p.s_q, p.h_q, HEAD_DIM_K])?,
            k_cache: self.desc(
                self.elems_ptr(&self.kv),
                dt.scalar(),
                &[p.num_blocks, p.page_size, p.h_kv, HEAD_DIM_K],
            )?,
            block_table: self.desc(self.ptr(&self.block_table), ScalarType::I32, &[b, p.max_blocks_per_seq])?,
            cache_seqlens: self.desc(self.ptr(&self.seqlens), ScalarType::I32, &[b])?,
            head_dim_v: HEAD_DIM_V,
            tile_scheduler_metadata: self.desc(self.ptr(&self.metadata), ScalarType::I32, &[self.parts, 8])?,
            num_splits: self.desc(self.ptr(&self.num_splits), ScalarType::I32, &[b + 1])?,
            softmax_scale: p.softmax_scale,
            causal: p.causal,
            descale_q: descale(0)?,
            descale_k: descale(1)?,
            out: self.desc(self.ptr(&self.out), dt.out_dtype(), &[b, p.s_q, p.h_q, HEAD_DIM_V])?,
            lse: self.desc(self.ptr(&self.lse), ScalarType::F32, &[b, p.h_q, p.s_q])?,
        };
        // SAFETY: the run's own device buffer of `workspace.len()` bytes, used by nothing else during the call.
        let ws = unsafe { Workspace::from_raw(self.ptr(&self.workspace), self.workspace.len(), self.device) };
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timing).map_err(cuda)?;
        self.backend.decode(&args, ws, Stream::DEFAULT)?;
        let end = self.stream.record_event(timing).map_err(cuda)?;
        let ms = start.elapsed_ms(&end).map_err(cuda)?;
        Ok(Duration::from_secs_f64(ms as f64 / 1e3))
    }

    /// The outputs of the last decode, downloaded and widened.
    pub fn outputs(&self) -> CliResult<HostOutputs> {
        let out = self.stream.clone_dtoh(&self.out).map_err(cuda)?;
        let lse = self.stream.clone_dtoh(&self.lse).map_err(cuda)?;
        let widen: fn(u16) -> f32 =
            if self.problem.dtype.out_dtype() == ScalarType::F16 { f16_to_f32 } else { bf16_to_f32 };
        Ok(HostOutputs { out: out.into_iter().map(widen).collect(), lse })
    }
}
