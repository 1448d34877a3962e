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
use std::marker::PhantomData;

use crate::dtype::DType;
use crate::error::Result;
use crate::problem::{
    DecodeArgs, DecodeShape, HEAD_DIM_K, HEAD_DIM_V, MetadataArgs, ValidatedDecode, ValidatedMetadata,
};
use crate::scheduler;
use crate::sparse::{self, Fp8Capabilities, Fp8DecodeArgs, Fp8Shape, ValidatedFp8Decode, ValidatedFp8Metadata};
use crate::splitkv::WorkspaceLayout;
use crate::tensor::{Device, Element};

/// An opaque stream handle (`cudaStream_t` / `CUstream` on CUDA backends; ignored by the CPU backend).
/// The null handle ([`Stream::DEFAULT`]) is the device's legacy default stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream(*mut c_void);

impl Stream {
    /// The default stream.
    pub const DEFAULT: Stream = Stream(std::ptr::null_mut());

    /// A stream from a raw handle.
    ///
    /// # Safety
    /// `handle` is null or a live stream of the CUDA context the backend runs in, and stays live until the work
    /// enqueued on it has finished. (The CPU backend never uses it.)
    pub unsafe fn from_raw(handle: *mut c_void) -> Stream {
        Stream(handle)
    }

    /// The raw handle.
    pub fn as_raw(&self) -> *mut c_void {
        self.0
    }
}

// SAFETY: a stream handle is an opaque token; CUDA stream handles may be used from any thread.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

/// A caller-owned scratch buffer on the backend's device, valid for `'a`.
///
/// Made safely from a borrowed host slice ([`Workspace::host`]) or, for device memory, through the `unsafe`
/// [`Workspace::from_raw`]. Its size is checked against [`MlaBackend::workspace_size`] once, by
/// [`MlaBackend::decode`].
#[derive(Clone, Copy, Debug)]
pub struct Workspace<'a> {
    ptr: *mut c_void,
    bytes: usize,
    device: Device,
    _memory: PhantomData<&'a mut [u8]>,
}

// Neither `Send` nor `Sync`, for the reason given at `TensorDesc`: a `Copy` workspace on two threads could be
// handed to two concurrent calls.

impl<'a> Workspace<'a> {
    /// No workspace (enough for shapes whose [`MlaBackend::workspace_size`] is 0).
    pub const EMPTY: Workspace<'static> =
        Workspace { ptr: std::ptr::null_mut(), bytes: 0, device: Device::Host, _memory: PhantomData };

    /// A workspace from an address.
    ///
    /// # Safety
    /// For all of `'a`, `bytes` bytes from `ptr` lie in one live allocation on `device`, valid for reads and
    /// writes, that nothing else reads or writes while a call using the workspace runs (on a GPU: until the work
    /// enqueued by the call has finished). `ptr` may be null only when `bytes` is 0.
    pub unsafe fn from_raw(ptr: *mut c_void, bytes: usize, device: Device) -> Workspace<'a> {
        Workspace { ptr, bytes, device, _memory: PhantomData }
    }

    /// A workspace borrowing a host slice (a `Vec<f32>` gives the 4-byte alignment the CPU backend needs).
    pub fn host<T: Element>(buf: &'a mut [T]) -> Workspace<'a> {
        let bytes = std::mem::size_of_val(buf);
        Workspace { ptr: buf.as_mut_ptr().cast(), bytes, device: Device::Host, _memory: PhantomData }
    }

    /// Start address (null when empty).
    pub fn ptr(&self) -> *mut c_void {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Where the memory lives.
    pub fn device(&self) -> Device {
        self.device
    }
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
    ///
    /// Validates every argument once ([`crate::validate_metadata`]) and hands the result to
    /// [`MlaBackend::metadata_validated`]; backends implement that, not this.
    fn get_mla_metadata(&self, args: &MetadataArgs, stream: Stream) -> Result<()> {
        let v = ValidatedMetadata::new(args, self.capabilities())?;
        self.metadata_validated(&v, stream)
    }

    /// The scheduler step on arguments already validated against this backend's capabilities.
    fn metadata_validated(&self, v: &ValidatedMetadata, stream: Stream) -> Result<()>;

    /// Bytes of workspace [`MlaBackend::decode`] needs for this shape.
    fn workspace_size(&self, shape: &DecodeShape) -> Result<usize> {
        let p = self.num_sm_parts(shape.q_seq_per_hk(), shape.h_kv);
        Ok(WorkspaceLayout::new(shape.batch, shape.q_seq_per_hk(), shape.h_kv, p)?.total_bytes)
    }

    /// The decode step: split-KV attention plus combine, writing `out` and `lse`.
    ///
    /// Validates every argument and the workspace (size from [`MlaBackend::workspace_size`], device, no overlap)
    /// once and hands the result to [`MlaBackend::decode_validated`]; backends implement that, not this. On GPU
    /// backends this enqueues work on `stream` and returns; it performs no allocation and no host
    /// synchronisation.
    fn decode(&self, args: &DecodeArgs, workspace: Workspace, stream: Stream) -> Result<()> {
        let v = ValidatedDecode::new(args, workspace, self.capabilities(), |shape| self.workspace_size(shape))?;
        self.decode_validated(&v, stream)
    }

    /// The decode step on arguments and a workspace already validated against this backend: only
    /// device-specific checks remain (alignment, say).
    fn decode_validated(&self, v: &ValidatedDecode, stream: Stream) -> Result<()>;

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
    /// stay the same.
    ///
    /// Validates every argument once ([`crate::sparse::validate_fp8_metadata`]: the decode's checks, with the two
    /// metadata buffers as the outputs) and hands the result to [`MlaBackend::fp8_metadata_validated`]; backends
    /// implement that, not this.
    fn fp8_get_metadata(&self, args: &Fp8DecodeArgs, stream: Stream) -> Result<()> {
        let v = ValidatedFp8Metadata::new(args, self.capabilities())?;
        self.fp8_metadata_validated(&v, stream)
    }

    /// The scheduler step of a decode over an FP8 cache, on arguments already validated against this backend's
    /// capabilities. Default: unsupported.
    fn fp8_metadata_validated(&self, _v: &ValidatedFp8Metadata, _stream: Stream) -> Result<()> {
        Err(sparse::unsupported(self.name()))
    }

    /// The decode over an FP8 cache, sparse (with `indices`) or dense, writing `out` and `lse`
    /// ([`crate::sparse`] documents the arguments).
    ///
    /// Validates every argument ([`crate::validate_fp8_decode`]) and the workspace (size from
    /// [`MlaBackend::fp8_workspace_size`], device, no overlap) once and hands the result to
    /// [`MlaBackend::fp8_decode_validated`]; backends implement that, not this.
    fn fp8_decode(&self, args: &Fp8DecodeArgs, workspace: Workspace, stream: Stream) -> Result<()> {
        let v = ValidatedFp8Decode::new(args, workspace, self.capabilities(), |shape| self.fp8_workspace_size(shape))?;
        self.fp8_decode_validated(&v, stream)
    }

    /// The decode over an FP8 cache on arguments and a workspace already validated against this backend: only
    /// device-specific checks remain. Default: unsupported.
    fn fp8_decode_validated(&self, _v: &ValidatedFp8Decode, _stream: Stream) -> Result<()> {
        Err(sparse::unsupported(self.name()))
    }
}
