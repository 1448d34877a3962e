//! The entry points: backend handles, capability and size queries, the scheduler step and the decode step.
//!
//! Each function is a thin shell: decode the C arguments (null checks, integer ranges, tensor descriptors),
//! then call the [`MlaBackend`] behind the handle. Shape, dtype, stride and device rules live in
//! [`mla_core::validate_decode`] / [`mla_core::validate_metadata`], so the C ABI and Rust callers reject exactly the
//! same inputs with the same messages.

use std::ffi::{CStr, CString, c_char, c_void};

use mla_core::{
    DecodeArgs, DecodeShape, Device, Error, MetadataArgs, MlaBackend, PageSizes, Result, Stream, Workspace,
};

use crate::status::{boundary, flashmla_status};
use crate::tensor::{flashmla_device_type, flashmla_dtype, flashmla_tensor, optional_tensor_arg, tensor_arg};
use mla::{BACKEND_NAMES, open_backend};

/// Version of the C ABI described by `include/flashmla.h`. Bumped on every incompatible change (a changed
/// signature, struct layout or constant value) and when entry points are added; compare it with
/// `flashmla_abi_version()` at load time. Version 2 added the decode over FP8 caches (`flashmla_fp8_*`,
/// `flashmla_backend_fp8_capabilities`) and `FLASHMLA_DTYPE_U8`; every version-1 entry point is unchanged.
pub const FLASHMLA_ABI_VERSION: u32 = 2;

/// int32 words per row of `tile_scheduler_metadata` (its shape is `[num_sm_parts, FLASHMLA_METADATA_WORDS]`).
pub const FLASHMLA_METADATA_WORDS: i32 = 8;
/// Width of a K row: 512 latent + 64 RoPE columns.
pub const FLASHMLA_HEAD_DIM_K: i32 = 576;
/// Width of a V row (the first 512 columns of the K row); the only accepted `head_dim_v`.
pub const FLASHMLA_HEAD_DIM_V: i32 = 512;
/// Capacity of `flashmla_capabilities.head_dims_k` / `head_dims_v`.
pub const FLASHMLA_MAX_HEAD_DIMS: usize = 4;
/// Capacity of `flashmla_capabilities.page_sizes`.
pub const FLASHMLA_MAX_PAGE_SIZES: usize = 16;

const _: () = assert!(FLASHMLA_METADATA_WORDS as usize == mla_core::scheduler::METADATA_WORDS);
const _: () = assert!(FLASHMLA_HEAD_DIM_K as usize == mla_core::HEAD_DIM_K);
const _: () = assert!(FLASHMLA_HEAD_DIM_V as usize == mla_core::HEAD_DIM_V);

/// A CUDA stream: pass a `cudaStream_t` / `CUstream` (converts implicitly to `void*`), or NULL for the device's
/// legacy default stream. The CPU backend ignores it and finishes its work before returning.
#[allow(non_camel_case_types)]
pub type flashmla_stream = *mut c_void;

/// An opened backend (`cpu`, `hopper`), bound to one device.
///
/// Thread safety: a handle may be used from any number of threads at once; every call only reads it. Free it
/// once, after every other call on it has returned.
#[allow(non_camel_case_types)]
pub struct flashmla_backend {
    pub(crate) inner: Box<dyn MlaBackend>,
    name: CString,
    device_name: CString,
}

impl flashmla_backend {
    fn new(inner: Box<dyn MlaBackend>) -> Self {
        let c = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
        let caps = inner.capabilities();
        flashmla_backend { name: c(caps.backend), device_name: c(&caps.device_name), inner }
    }
}

/// What a backend supports, for dispatch without version sniffing. Filled by `flashmla_backend_capabilities`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct flashmla_capabilities {
    /// Backend name (`"cpu"`, `"hopper"`); owned by the handle, valid until it is freed.
    pub backend: *const c_char,
    /// CPU model or GPU name; owned by the handle, valid until it is freed.
    pub device_name: *const c_char,
    /// Where every tensor passed to this backend must live: a `flashmla_device_type`.
    pub device_type: i32,
    /// The device ordinal (0 for the CPU).
    pub device_id: i32,
    /// Streaming multiprocessors (GPU) or worker threads (CPU); drives `num_sm_parts`.
    pub sm_count: i32,
    /// CUDA compute capability major (9 for Hopper); 0 when not a GPU.
    pub compute_capability_major: i32,
    /// CUDA compute capability minor; 0 when not a GPU.
    pub compute_capability_minor: i32,
    /// Supported input dtypes: bit `1u << FLASHMLA_DTYPE_x` is set for each supported `q`/`k_cache` dtype.
    pub dtypes: u32,
    /// Entries used in `head_dims_k` / `head_dims_v`.
    pub num_head_dims: i32,
    /// Supported (head_dim_k, head_dim_v) pairs, first half.
    pub head_dims_k: [i32; FLASHMLA_MAX_HEAD_DIMS],
    /// Supported (head_dim_k, head_dim_v) pairs, second half.
    pub head_dims_v: [i32; FLASHMLA_MAX_HEAD_DIMS],
    /// 1 when every page size >= 1 is accepted (then `num_page_sizes` is 0), else 0.
    pub any_page_size: i32,
    /// Entries used in `page_sizes`.
    pub num_page_sizes: i32,
    /// The accepted page sizes when `any_page_size` is 0.
    pub page_sizes: [i32; FLASHMLA_MAX_PAGE_SIZES],
}

// The layout bindings rely on (see tests/c/abi_test.c); a change here is an ABI version bump.
const _: () = assert!(std::mem::size_of::<flashmla_capabilities>() == 152);
const _: () = assert!(std::mem::offset_of!(flashmla_capabilities, page_sizes) == 84);

/// Borrows the handle behind a C pointer.
///
/// # Safety
/// `p` is NULL or a live handle from `flashmla_backend_open`.
pub(crate) unsafe fn backend_arg<'a>(p: *const flashmla_backend) -> Result<&'a flashmla_backend> {
    // SAFETY: the caller guarantees `p` is NULL or a live handle; handles are only ever read.
    unsafe { p.as_ref() }.ok_or_else(|| Error::invalid("backend", "a handle from flashmla_backend_open", "NULL"))
}

/// Checks that an output pointer is non-null.
pub(crate) fn out_arg<T>(name: &str, p: *mut T) -> Result<*mut T> {
    if p.is_null() { Err(Error::invalid(name, "a non-null pointer", "NULL")) } else { Ok(p) }
}

/// A count that must be >= 1.
pub(crate) fn count_arg(name: &str, v: i64) -> Result<usize> {
    usize::try_from(v).ok().filter(|v| *v >= 1).ok_or_else(|| Error::invalid(name, "a value >= 1", v))
}

/// A size that must be >= 0.
pub(crate) fn size_arg(name: &str, v: i64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(name, "a value >= 0", v))
}

/// Converts a size for an `int64_t` out-parameter.
pub(crate) fn to_i64(name: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(name, "a result that fits in int64_t", v))
}

/// The version of this C ABI: equals `FLASHMLA_ABI_VERSION` of the header the library was built with.
#[unsafe(no_mangle)]
pub extern "C" fn flashmla_abi_version() -> u32 {
    FLASHMLA_ABI_VERSION
}

/// The library's version string (`"0.1.0"`); static, never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn flashmla_version() -> *const c_char {
    const V: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("the crate version contains a NUL"),
    };
    V.as_ptr()
}

/// Opens a backend: `backend_name` is `"auto"` (Hopper if it opens, else CPU), `"cpu"` or `"hopper"`;
/// `device_ordinal` picks the CUDA device (ignored by the CPU backend).
///
/// On success `*out_backend` is the new handle; on failure it is set to NULL. A missing CUDA driver or library, or
/// no suitable GPU, gives `FLASHMLA_STATUS_UNAVAILABLE` (never an abort).
///
/// # Safety
/// `backend_name` is NULL or a NUL-terminated string; `out_backend` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_backend_open(
    backend_name: *const c_char,
    device_ordinal: i32,
    out_backend: *mut *mut flashmla_backend,
) -> flashmla_status {
    boundary("flashmla_backend_open", || {
        let out = out_arg("out_backend", out_backend)?;
        // SAFETY: `out` is non-null and the caller guarantees it is writable.
        unsafe { out.write(std::ptr::null_mut()) };
        if backend_name.is_null() {
            return Err(Error::invalid("backend_name", format!("one of {BACKEND_NAMES:?}"), "NULL"));
        }
        // SAFETY: non-null, and the caller guarantees NUL termination.
        let name = unsafe { CStr::from_ptr(backend_name) };
        let name =
            name.to_str().ok().filter(|n| BACKEND_NAMES.contains(n)).ok_or_else(|| {
                Error::invalid("backend_name", format!("one of {BACKEND_NAMES:?}"), format!("{name:?}"))
            })?;
        if device_ordinal < 0 {
            return Err(Error::invalid("device_ordinal", "a device ordinal >= 0", device_ordinal));
        }
        let handle = Box::new(flashmla_backend::new(open_backend(name, device_ordinal)?));
        // SAFETY: as above.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Frees a handle from `flashmla_backend_open`. NULL is a no-op.
///
/// # Safety
/// `backend` is NULL or a live handle that no other thread is using; it must not be used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_backend_free(backend: *mut flashmla_backend) {
    if backend.is_null() {
        return;
    }
    // A panic while dropping a backend must not unwind into C; there is no status to report it through, so it is
    // recorded as the thread's last error.
    let _ = boundary("flashmla_backend_free", || {
        // SAFETY: the caller passes a pointer from Box::into_raw in flashmla_backend_open, exactly once.
        drop(unsafe { Box::from_raw(backend) });
        Ok(())
    });
}

/// Fills `*out_caps` with what the backend supports (dtypes, head dims, page sizes, device, SM count).
///
/// # Safety
/// `backend` is NULL or a live handle; `out_caps` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_backend_capabilities(
    backend: *const flashmla_backend,
    out_caps: *mut flashmla_capabilities,
) -> flashmla_status {
    boundary("flashmla_backend_capabilities", || {
        // SAFETY: forwarded caller guarantee.
        let b = unsafe { backend_arg(backend) }?;
        let out = out_arg("out_caps", out_caps)?;
        let caps = b.inner.capabilities();
        let too_many = |what: &str, n: usize| {
            Error::backend(caps.backend, format!("{n} {what} do not fit the capability struct of this ABI version"))
        };
        if caps.head_dims.len() > FLASHMLA_MAX_HEAD_DIMS {
            return Err(too_many("head-dim pairs", caps.head_dims.len()));
        }
        let (device_type, device_id) = match caps.device {
            Device::Host => (flashmla_device_type::CPU as i32, 0),
            Device::Cuda(i) => (flashmla_device_type::CUDA as i32, i),
        };
        let (major, minor) = caps.compute_capability.unwrap_or((0, 0));
        let mut c = flashmla_capabilities {
            backend: b.name.as_ptr(),
            device_name: b.device_name.as_ptr(),
            device_type,
            device_id,
            sm_count: i32::try_from(caps.sm_count).unwrap_or(i32::MAX),
            compute_capability_major: major as i32,
            compute_capability_minor: minor as i32,
            dtypes: caps.dtypes.iter().fold(0u32, |m, d| m | 1 << flashmla_dtype::of_scalar(d.scalar()) as u32),
            num_head_dims: caps.head_dims.len() as i32,
            head_dims_k: [0; FLASHMLA_MAX_HEAD_DIMS],
            head_dims_v: [0; FLASHMLA_MAX_HEAD_DIMS],
            any_page_size: 0,
            num_page_sizes: 0,
            page_sizes: [0; FLASHMLA_MAX_PAGE_SIZES],
        };
        for (i, &(k, v)) in caps.head_dims.iter().enumerate() {
            c.head_dims_k[i] = k as i32;
            c.head_dims_v[i] = v as i32;
        }
        match &caps.page_sizes {
            PageSizes::Any => c.any_page_size = 1,
            PageSizes::Only(sizes) => {
                if sizes.len() > FLASHMLA_MAX_PAGE_SIZES {
                    return Err(too_many("page sizes", sizes.len()));
                }
                c.num_page_sizes = sizes.len() as i32;
                for (slot, &p) in c.page_sizes.iter_mut().zip(sizes) {
                    *slot = i32::try_from(p).unwrap_or(i32::MAX);
                }
            }
        }
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { out.write(c) };
        Ok(())
    })
}

/// Rows of `tile_scheduler_metadata` (`num_sm_parts`) for a step with `num_heads_per_head_k = s_q * h_q / h_kv`
/// query rows per KV head and `num_heads_k = h_kv` KV heads. Allocate `tile_scheduler_metadata` as int32
/// `[num_sm_parts, FLASHMLA_METADATA_WORDS]` and `num_splits` as int32 `[batch + 1]`, on the backend's device.
///
/// # Safety
/// `backend` is NULL or a live handle; `out_num_sm_parts` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_num_sm_parts(
    backend: *const flashmla_backend,
    num_heads_per_head_k: i64,
    num_heads_k: i64,
    out_num_sm_parts: *mut i64,
) -> flashmla_status {
    boundary("flashmla_num_sm_parts", || {
        // SAFETY: forwarded caller guarantee.
        let b = unsafe { backend_arg(backend) }?;
        let q_seq_per_hk = count_arg("num_heads_per_head_k", num_heads_per_head_k)?;
        let h_kv = count_arg("num_heads_k", num_heads_k)?;
        let out = out_arg("out_num_sm_parts", out_num_sm_parts)?;
        let parts = to_i64("num_sm_parts", b.inner.num_sm_parts(q_seq_per_hk, h_kv))?;
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { out.write(parts) };
        Ok(())
    })
}

/// Bytes of workspace `flashmla_with_kvcache` needs for this problem size; `dtype` is the `q`/`k_cache` dtype.
/// Allocate it once for the largest batch on the backend's device (any alignment of 256 bytes or more).
///
/// # Safety
/// `backend` is NULL or a live handle; `out_bytes` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_workspace_size(
    backend: *const flashmla_backend,
    batch: i64,
    s_q: i64,
    h_q: i64,
    h_kv: i64,
    dtype: i32,
    out_bytes: *mut i64,
) -> flashmla_status {
    boundary("flashmla_workspace_size", || {
        // SAFETY: forwarded caller guarantee.
        let b = unsafe { backend_arg(backend) }?;
        let shape = decode_shape(batch, s_q, h_q, h_kv, dtype)?;
        let out = out_arg("out_bytes", out_bytes)?;
        let bytes = to_i64("workspace size", b.inner.workspace_size(&shape)?)?;
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { out.write(bytes) };
        Ok(())
    })
}

/// Checks the integers of `flashmla_workspace_size`.
fn decode_shape(batch: i64, s_q: i64, h_q: i64, h_kv: i64, dtype: i32) -> Result<DecodeShape> {
    let batch = count_arg("batch", batch)?;
    let s_q = count_arg("s_q", s_q)?;
    let h_q = count_arg("h_q", h_q)?;
    let h_kv = count_arg("h_kv", h_kv)?;
    if h_q % h_kv != 0 {
        return Err(Error::invalid("h_q", format!("a multiple of h_kv = {h_kv}"), h_q));
    }
    if s_q.checked_mul(h_q / h_kv).is_none_or(|r| r > i64::MAX as usize) {
        return Err(Error::invalid("s_q", "s_q * h_q / h_kv that fits in int64_t", s_q));
    }
    let dtype = flashmla_dtype::from_code(dtype)
        .and_then(|d| d.scalar().as_input())
        .ok_or_else(|| Error::invalid("dtype", "FLASHMLA_DTYPE_BF16, _FP16 or _E4M3", dtype))?;
    Ok(DecodeShape { batch, s_q, h_q, h_kv, dtype })
}

/// The scheduler step (upstream `get_mla_metadata`): reads `cache_seqlens` (int32 `[batch]`) where it lives and
/// writes `tile_scheduler_metadata` (int32 `[num_sm_parts, FLASHMLA_METADATA_WORDS]`, see `flashmla_num_sm_parts`)
/// and `num_splits` (int32 `[batch + 1]`). All three live on the backend's device; on a GPU this only enqueues work
/// on `stream`. Run it once per decoding step and reuse the result in every layer.
///
/// # Safety
/// `backend` is NULL or a live handle; each tensor pointer is NULL or points to a descriptor whose memory is valid
/// for its shape and strides (and for writing, for the two outputs).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_get_mla_metadata(
    backend: *const flashmla_backend,
    cache_seqlens: *const flashmla_tensor,
    num_heads_per_head_k: i64,
    num_heads_k: i64,
    tile_scheduler_metadata: *const flashmla_tensor,
    num_splits: *const flashmla_tensor,
    stream: flashmla_stream,
) -> flashmla_status {
    boundary("flashmla_get_mla_metadata", || {
        // SAFETY: forwarded caller guarantee.
        let b = unsafe { backend_arg(backend) }?;
        let args = MetadataArgs {
            // SAFETY: forwarded caller guarantee.
            cache_seqlens: unsafe { tensor_arg("cache_seqlens", cache_seqlens) }?,
            q_seq_per_hk: count_arg("num_heads_per_head_k", num_heads_per_head_k)?,
            h_kv: count_arg("num_heads_k", num_heads_k)?,
            // SAFETY: forwarded caller guarantee.
            tile_scheduler_metadata: unsafe { tensor_arg("tile_scheduler_metadata", tile_scheduler_metadata) }?,
            // SAFETY: forwarded caller guarantee.
            num_splits: unsafe { tensor_arg("num_splits", num_splits) }?,
        };
        // SAFETY: the caller guarantees a live stream of the backend's context (or NULL), per the ABI's contract.
        let stream = unsafe { Stream::from_raw(stream) };
        b.inner.get_mla_metadata(&args, stream)
    })
}

/// The decode step (upstream `flash_mla_with_kvcache`): attention of `q` over the paged `k_cache`, written to
/// `out` and `lse`.
///
/// | argument | shape | dtype |
/// |---|---|---|
/// | `q` | `[batch, s_q, h_q, 576]` | BF16 / FP16 / E4M3 |
/// | `k_cache` | `[num_blocks, page_size, h_kv, 576]` (V = first 512 columns) | = `q` |
/// | `block_table` | `[batch, max_blocks_per_seq]` | I32 |
/// | `cache_seqlens` | `[batch]` | I32 |
/// | `tile_scheduler_metadata`, `num_splits` | from `flashmla_get_mla_metadata` | I32 |
/// | `descale_q`, `descale_k` | `[1]`, or NULL; required for E4M3, NULL otherwise | F32 |
/// | `out` | `[batch, s_q, h_q, 512]` | BF16 for BF16/E4M3 inputs, FP16 for FP16 |
/// | `lse` | `[batch, h_q, s_q]`, natural log; a row that sees no key gets `out = 0`, `lse = +inf` | F32 |
///
/// `head_dim_v` must be 512. `softmax_scale` NaN means the default `576^-0.5`. `causal` nonzero applies the
/// bottom-right aligned causal mask (no effect when `s_q == 1`). `workspace` is caller-owned device memory of at
/// least `flashmla_workspace_size` bytes. On a GPU the call only enqueues work on `stream`: no allocation, no host
/// synchronisation, capturable in a CUDA graph. On any error status nothing has been written to `out` or `lse`.
///
/// # Safety
/// `backend` is NULL or a live handle; each tensor pointer is NULL or points to a descriptor whose memory is valid
/// for its shape and strides (writable for `out` and `lse`); `workspace` is valid for `workspace_bytes` bytes.
#[allow(clippy::too_many_arguments)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_with_kvcache(
    backend: *const flashmla_backend,
    q: *const flashmla_tensor,
    k_cache: *const flashmla_tensor,
    block_table: *const flashmla_tensor,
    cache_seqlens: *const flashmla_tensor,
    head_dim_v: i64,
    tile_scheduler_metadata: *const flashmla_tensor,
    num_splits: *const flashmla_tensor,
    softmax_scale: f32,
    causal: i32,
    descale_q: *const flashmla_tensor,
    descale_k: *const flashmla_tensor,
    out: *const flashmla_tensor,
    lse: *const flashmla_tensor,
    workspace: *mut c_void,
    workspace_bytes: i64,
    stream: flashmla_stream,
) -> flashmla_status {
    boundary("flashmla_with_kvcache", || {
        // SAFETY: forwarded caller guarantee.
        let b = unsafe { backend_arg(backend) }?;
        // SAFETY: every tensor_arg below reads a descriptor pointer the caller guarantees NULL or valid.
        let args = unsafe {
            DecodeArgs {
                q: tensor_arg("q", q)?,
                k_cache: tensor_arg("k_cache", k_cache)?,
                block_table: tensor_arg("block_table", block_table)?,
                cache_seqlens: tensor_arg("cache_seqlens", cache_seqlens)?,
                head_dim_v: size_arg("head_dim_v", head_dim_v)?,
                tile_scheduler_metadata: tensor_arg("tile_scheduler_metadata", tile_scheduler_metadata)?,
                num_splits: tensor_arg("num_splits", num_splits)?,
                softmax_scale: (!softmax_scale.is_nan()).then_some(softmax_scale),
                causal: causal != 0,
                descale_q: optional_tensor_arg("descale_q", descale_q)?,
                descale_k: optional_tensor_arg("descale_k", descale_k)?,
                out: tensor_arg("out", out)?,
                lse: tensor_arg("lse", lse)?,
            }
        };
        // Only the integer conversion happens here: `MlaBackend::decode` validates the arguments and the workspace
        // (size, address, device) once, before any backend touches memory.
        let bytes = size_arg("workspace_bytes", workspace_bytes)?;
        // SAFETY: the caller guarantees `workspace` valid for `workspace_bytes` bytes of the backend's device for
        // the call (and a live stream, or NULL), per this function's contract.
        let (workspace, stream) =
            unsafe { (Workspace::from_raw(workspace, bytes, b.inner.capabilities().device), Stream::from_raw(stream)) };
        b.inner.decode(&args, workspace, stream)
    })
}
