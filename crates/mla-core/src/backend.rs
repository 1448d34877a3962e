//! The backend trait: what every implementation (CPU, Hopper, …) provides.
//!
//! The trait is object safe, so a host picks a backend at run time and holds it as `Box<dyn MlaBackend>`.
//! A decoding step is two calls, mirroring upstream FlashMLA:
//!
//! ```text
//!   get_mla_metadata(cache_seqlens) ─► tile_scheduler_metadata [P, 8], num_splits [b+1]   (once per step)
//!   decode(q, k_cache, …, metadata, num_splits, workspace) ─► out, lse                    (once per layer)
//! ```
//!
//! Every buffer is owned by the caller, including the split-KV workspace (sized by [`MlaBackend::workspace_size`]).
//! On GPU backends neither call allocates or synchronises with the host, so both can be captured in a CUDA graph.

use std::ffi::c_void;

use crate::dtype::DType;
use crate::error::Result;
use crate::problem::{DecodeArgs, DecodeShape, HEAD_DIM_K, HEAD_DIM_V, MetadataArgs};
use crate::scheduler;
use crate::sparse::{self, Fp8Capabilities, Fp8DecodeArgs, Fp8Shape};
use crate::splitkv::WorkspaceLayout;
use crate::tensor::Device;

/// An opaque stream handle (`cudaStream_t` / `CUstream` on CUDA backends; ignored by the CPU backend).
/// The null handle is the device's legacy default stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream(pub *mut c_void);

impl Stream {
    /// The default stream.
    pub const DEFAULT: Stream = Stream(std::ptr::null_mut());
}

// SAFETY: a stream handle is an opaque token; CUDA stream handles may be used from any thread.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

/// A caller-owned scratch buffer on the backend's device.
#[derive(Clone, Copy, Debug)]
pub struct Workspace {
    /// Start address (may be null when `bytes` is 0).
    pub ptr: *mut c_void,
    /// Size in bytes.
    pub bytes: usize,
}

impl Workspace {
    /// No workspace.
    pub const EMPTY: Workspace = Workspace { ptr: std::ptr::null_mut(), bytes: 0 };
}

/// Which KV-cache page sizes a backend accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageSizes {
    /// Any page size ≥ 1.
    Any,
    /// Only these.
    Only(Vec<usize>),
}

impl PageSizes {
    /// Is `page_size` accepted?
    pub fn accepts(&self, page_size: usize) -> bool {
        match self {
            PageSizes::Any => page_size >= 1,
            PageSizes::Only(v) => v.contains(&page_size),
        }
    }

    /// Human-readable description for error messages.
    pub fn describe(&self) -> String {
        match self {
            PageSizes::Any => "any page size >= 1".into(),
            PageSizes::Only(v) => format!("page size in {v:?}"),
        }
    }
}

/// What a backend can do, for dispatch without version sniffing.
#[derive(Clone, Debug, PartialEq)]
pub struct Capabilities {
    /// Backend name (`cpu`, `hopper`).
    pub backend: &'static str,
    /// The device every tensor must live on.
    pub device: Device,
    /// Device name (CPU model or GPU name).
    pub device_name: String,
    /// Streaming multiprocessors (GPU) or worker threads (CPU): the scheduler's parallelism.
    pub sm_count: usize,
    /// CUDA compute capability, if a GPU.
    pub compute_capability: Option<(u32, u32)>,
    /// Supported input dtypes.
    pub dtypes: Vec<DType>,
    /// Supported (head_dim_k, head_dim_v) pairs.
    pub head_dims: Vec<(usize, usize)>,
    /// Supported page sizes.
    pub page_sizes: PageSizes,
    /// Decode over FP8 caches (sparse and dense): layouts and optional features; [`Fp8Capabilities::none`] when the
    /// backend has none (its `fp8_*` methods then answer [`crate::Error::Unsupported`]).
    pub fp8: Fp8Capabilities,
}

impl Capabilities {
    /// The MLA head dims every backend supports.
    pub const MLA_HEAD_DIMS: (usize, usize) = (HEAD_DIM_K, HEAD_DIM_V);
}

/// A multi-head latent attention decode backend.
pub trait MlaBackend: Send + Sync {
    /// Short name (`cpu`, `hopper`).
    fn name(&self) -> &'static str;

    /// What this backend supports and which device it runs on.
    fn capabilities(&self) -> &Capabilities;

    /// Rows of `tile_scheduler_metadata` for this shape (`num_sm_parts`).
    fn num_sm_parts(&self, q_seq_per_hk: usize, h_kv: usize) -> usize {
        scheduler::num_sm_parts(self.capabilities().sm_count, q_seq_per_hk, h_kv)
    }

    /// The scheduler step: reads `cache_seqlens` where they live and writes `tile_scheduler_metadata` and
    /// `num_splits` (all on this backend's device). Computed once per decoding step, reused by every layer.
    fn get_mla_metadata(&self, args: &MetadataArgs, stream: Stream) -> Result<()>;

    /// Bytes of workspace [`MlaBackend::decode`] needs for this shape.
    fn workspace_size(&self, shape: &DecodeShape) -> Result<usize> {
        let p = self.num_sm_parts(shape.q_seq_per_hk(), shape.h_kv);
        Ok(WorkspaceLayout::new(shape.batch, shape.q_seq_per_hk(), shape.h_kv, p)?.total_bytes)
    }

    /// The decode step: split-KV attention plus combine, writing `out` and `lse`.
    ///
    /// On GPU backends this enqueues work on `stream` and returns; it performs no allocation and no host
    /// synchronisation.
    fn decode(&self, args: &DecodeArgs, workspace: Workspace, stream: Stream) -> Result<()>;

    /// Rows of `tile_scheduler_metadata` for a decode over an FP8 cache ([`sparse::num_sm_parts`]).
    fn fp8_num_sm_parts(&self, s_q: usize, h_q: usize) -> usize {
        sparse::num_sm_parts(self.capabilities().sm_count, s_q, h_q)
    }

    /// Bytes of workspace [`MlaBackend::fp8_decode`] needs for this shape. Default: unsupported.
    fn fp8_workspace_size(&self, _shape: &Fp8Shape) -> Result<usize> {
        Err(sparse::unsupported(self.name()))
    }

    /// The scheduler step of a decode over an FP8 cache: reads the lengths that fix each request's work
    /// (`topk_length` / `extra_topk_length` in sparse mode, `cache_seqlens` in dense mode) and writes
    /// `tile_scheduler_metadata` and `num_splits`. It takes the decode's own arguments, as upstream computes the
    /// metadata in the first `flash_mla_with_kvcache` call; reuse the result while the shapes and those lengths
    /// stay the same. Default: unsupported.
    fn fp8_get_metadata(&self, _args: &Fp8DecodeArgs, _stream: Stream) -> Result<()> {
        Err(sparse::unsupported(self.name()))
    }

    /// The decode over an FP8 cache, sparse (with `indices`) or dense, writing `out` and `lse`
    /// ([`crate::sparse`] documents the arguments). Default: unsupported.
    fn fp8_decode(&self, _args: &Fp8DecodeArgs, _workspace: Workspace, _stream: Stream) -> Result<()> {
        Err(sparse::unsupported(self.name()))
    }
}
