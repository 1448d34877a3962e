//! The decode over FP8 KV caches (ABI version 2): sparse top-k (DeepSeek V3.2 and MODEL1/V4 layouts) and dense
//! (V3.2 layout), with a versioned parameter struct, plus host-side quantisation helpers.
//!
//! | C entry point | does |
//! |---|---|
//! | `flashmla_backend_fp8_capabilities` | which layouts each mode supports, and the optional sparse features |
//! | `flashmla_fp8_num_sm_parts`, `flashmla_fp8_workspace_size` | buffer sizes for the two steps |
//! | `flashmla_fp8_get_metadata` | scheduler step, from the decode's own parameters (once per decoding step) |
//! | `flashmla_fp8_decode` | decode step (once per layer) |
//! | `flashmla_fp8_quantize`, `flashmla_fp8_dequantize` | host-memory caches to and from the layouts (exact) |
//!
//! Every rule on shapes, dtypes, strides, devices and values lives in [`mla_core::sparse`] and the backend, so Rust
//! and C callers get the same errors: this layer converts the parameter struct and the integers, and
//! [`mla_core::MlaBackend::fp8_get_metadata`] / [`mla_core::MlaBackend::fp8_decode`] validate once.
//! `docs/sparse-fp8.md` documents the layouts and the arguments.

use std::ffi::c_void;

use mla_core::{Error, Fp8DecodeArgs, Fp8Layout, Fp8Shape, Result, Stream, Workspace};

use crate::api::{backend_arg, count_arg, flashmla_backend, flashmla_stream, out_arg, size_arg, to_i64};
use crate::status::{boundary, flashmla_status};
use crate::tensor::{flashmla_tensor, optional_tensor_arg, tensor_arg};

/// FP8 KV-cache layout codes (bit `1u << code` in `flashmla_fp8_capabilities`). The layout of a cache follows from
/// its last dimension: 656 bytes per token is V3.2, 584 is MODEL1.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum flashmla_fp8_layout {
    /// DeepSeek V3.2: d_qk 576, 656 bytes per token (512 e4m3, 4 float32 scales, 64 bfloat16 RoPE).
    V32 = 1,
    /// MODEL1 (DeepSeek V4): d_qk 512, 584 bytes per token (448 e4m3, 64 bfloat16 RoPE, 7 UE8M0 scales, 1 pad).
    MODEL1 = 2,
}

impl flashmla_fp8_layout {
    /// The code of a core layout.
    pub const fn of(layout: Fp8Layout) -> Self {
        match layout {
            Fp8Layout::V32 => flashmla_fp8_layout::V32,
            Fp8Layout::Model1 => flashmla_fp8_layout::MODEL1,
        }
    }
}

/// Sparse feature bit: `attn_sink` is supported.
pub const FLASHMLA_SPARSE_ATTN_SINK: u32 = 1;
/// Sparse feature bit: `topk_length` is supported.
pub const FLASHMLA_SPARSE_TOPK_LENGTH: u32 = 2;
/// Sparse feature bit: `extra_k_cache` with `extra_indices_in_kvcache` is supported.
pub const FLASHMLA_SPARSE_EXTRA_CACHE: u32 = 4;
/// Sparse feature bit: `extra_topk_length` is supported.
pub const FLASHMLA_SPARSE_EXTRA_TOPK_LENGTH: u32 = 8;
/// Capacity of `flashmla_fp8_capabilities.sparse_features` (indexed by `flashmla_fp8_layout` code).
pub const FLASHMLA_FP8_MAX_LAYOUTS: usize = 4;

/// What a backend supports of the decode over FP8 caches. Filled by `flashmla_backend_fp8_capabilities`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct flashmla_fp8_capabilities {
    /// Sparse decode: bit `1u << FLASHMLA_FP8_LAYOUT_x` for each supported layout (0: no sparse decode).
    pub sparse_layouts: u32,
    /// Dense decode: bit `1u << FLASHMLA_FP8_LAYOUT_x` for each supported layout (0: no dense decode).
    pub dense_layouts: u32,
    /// `sparse_features[code]`: the `FLASHMLA_SPARSE_*` bits supported with layout `code` (0 when unsupported).
    pub sparse_features: [u32; FLASHMLA_FP8_MAX_LAYOUTS],
}

const _: () = assert!(std::mem::size_of::<flashmla_fp8_capabilities>() == 24);

/// Parameters of `flashmla_fp8_get_metadata` and `flashmla_fp8_decode`, in the order of upstream's
/// `flash_mla_with_kvcache(..., is_fp8_kvcache=True, ...)`. Zero-initialise it, set `struct_size` to
/// `sizeof(flashmla_fp8_decode_params)`, then the tensors; a NULL tensor pointer is an absent argument.
///
/// Sparse mode (`indices` non-NULL): `q [b, s_q, h_q, d_qk]` bf16 (d_qk 576 V3.2, 512 MODEL1); `k_cache
/// [num_blocks, page_size, 1, bytes_per_token]` u8 or e4m3 (656 or 584; the tokens of a page block contiguous);
/// `indices [b, s_q, topk]` i32 (`page * page_size + offset`; entries outside `[0, num_blocks * page_size)` are
/// skipped); optional `topk_length [b]` i32, `attn_sink [h_q]` f32, `extra_k_cache` (same layout) with
/// `extra_indices_in_kvcache [b, s_q, extra_topk]` i32 and optional `extra_topk_length [b]` i32. `block_table` and
/// `cache_seqlens` are ignored. `causal` must be 0.
///
/// Dense mode (`indices` NULL; V3.2 layout): `block_table [b, max_blocks_per_seq]` i32 and `cache_seqlens [b]`
/// i32; `causal` nonzero applies the bottom-right aligned mask; the sparse-only tensors must be NULL.
///
/// Both: `tile_scheduler_metadata [num_sm_parts, 8]` and `num_splits [b + 1]` i32 (`flashmla_fp8_num_sm_parts`),
/// `out [b, s_q, h_q, 512]` bf16, `lse [b, h_q, s_q]` f32 (a row that attends to nothing: out 0, lse +inf);
/// `head_dim_v` 512; `softmax_scale` NaN means `d_qk^-0.5`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct flashmla_fp8_decode_params {
    /// `sizeof(flashmla_fp8_decode_params)` as the caller compiled it: the struct's version.
    pub struct_size: u32,
    /// Dense mode: nonzero for the causal mask. Must be 0 with indices.
    pub causal: i32,
    /// Must be 512.
    pub head_dim_v: i64,
    /// NaN: the default `d_qk^-0.5`.
    pub softmax_scale: f32,
    /// Must be 0.
    pub reserved: u32,
    /// Queries.
    pub q: *const flashmla_tensor,
    /// The cache.
    pub k_cache: *const flashmla_tensor,
    /// Dense mode: page ids.
    pub block_table: *const flashmla_tensor,
    /// Dense mode: lengths.
    pub cache_seqlens: *const flashmla_tensor,
    /// From `flashmla_fp8_get_metadata`.
    pub tile_scheduler_metadata: *const flashmla_tensor,
    /// From `flashmla_fp8_get_metadata`.
    pub num_splits: *const flashmla_tensor,
    /// Sparse mode: the selection.
    pub indices: *const flashmla_tensor,
    /// Sparse mode, optional.
    pub attn_sink: *const flashmla_tensor,
    /// Sparse mode, optional: a second cache.
    pub extra_k_cache: *const flashmla_tensor,
    /// Sparse mode, with `extra_k_cache`.
    pub extra_indices_in_kvcache: *const flashmla_tensor,
    /// Sparse mode, optional.
    pub topk_length: *const flashmla_tensor,
    /// Sparse mode, optional, with `extra_k_cache`.
    pub extra_topk_length: *const flashmla_tensor,
    /// Output.
    pub out: *const flashmla_tensor,
    /// Output.
    pub lse: *const flashmla_tensor,
}

// The layout bindings rely on; a change here is an ABI version bump.
const _: () = assert!(std::mem::size_of::<flashmla_fp8_decode_params>() == 136);
const _: () = assert!(std::mem::offset_of!(flashmla_fp8_decode_params, q) == 24);

/// Size of the parameter struct of ABI version 2.
const PARAMS_V2_BYTES: u32 = std::mem::size_of::<flashmla_fp8_decode_params>() as u32;

/// Reads and converts the parameter struct.
///
/// # Safety
/// `p` is NULL or points to a readable `flashmla_fp8_decode_params` whose tensor pointers are NULL or readable
/// descriptors that satisfy [`flashmla_tensor::to_desc`]'s contract for `'a`.
unsafe fn params_arg<'a>(p: *const flashmla_fp8_decode_params) -> Result<Fp8DecodeArgs<'a>> {
    // SAFETY: the caller guarantees NULL or readable; every field is a plain integer, float or pointer.
    let p = unsafe { p.as_ref() }
        .ok_or_else(|| Error::invalid("params", "a non-null flashmla_fp8_decode_params pointer", "NULL"))?;
    if p.struct_size != PARAMS_V2_BYTES {
        return Err(Error::invalid(
            "params.struct_size",
            format!("{PARAMS_V2_BYTES} (sizeof(flashmla_fp8_decode_params) of ABI version 2)"),
            p.struct_size,
        ));
    }
    if p.reserved != 0 {
        return Err(Error::invalid("params.reserved", 0, p.reserved));
    }
    // SAFETY: every tensor pointer is NULL or a readable descriptor of memory valid for `'a` (caller's guarantee).
    unsafe {
        Ok(Fp8DecodeArgs {
            q: tensor_arg("q", p.q)?,
            k_cache: tensor_arg("k_cache", p.k_cache)?,
            block_table: optional_tensor_arg("block_table", p.block_table)?,
            cache_seqlens: optional_tensor_arg("cache_seqlens", p.cache_seqlens)?,
            head_dim_v: size_arg("head_dim_v", p.head_dim_v)?,
            tile_scheduler_metadata: tensor_arg("tile_scheduler_metadata", p.tile_scheduler_metadata)?,
            num_splits: tensor_arg("num_splits", p.num_splits)?,
            softmax_scale: (!p.softmax_scale.is_nan()).then_some(p.softmax_scale),
            causal: p.causal != 0,
            indices: optional_tensor_arg("indices", p.indices)?,
            attn_sink: optional_tensor_arg("attn_sink", p.attn_sink)?,
            extra_k_cache: optional_tensor_arg("extra_k_cache", p.extra_k_cache)?,
            extra_indices_in_kvcache: optional_tensor_arg("extra_indices_in_kvcache", p.extra_indices_in_kvcache)?,
            topk_length: optional_tensor_arg("topk_length", p.topk_length)?,
            extra_topk_length: optional_tensor_arg("extra_topk_length", p.extra_topk_length)?,
            out: tensor_arg("out", p.out)?,
            lse: tensor_arg("lse", p.lse)?,
        })
    }
}

/// Fills `*out_caps` with what the backend supports of the decode over FP8 caches. A backend without it reports
/// all zeros (its `flashmla_fp8_*` calls then return `FLASHMLA_STATUS_UNSUPPORTED`).
///
/// # Safety
/// `backend` is NULL or a live handle; `out_caps` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_backend_fp8_capabilities(
    backend: *const flashmla_backend,
    out_caps: *mut flashmla_fp8_capabilities,
) -> flashmla_status {
    boundary("flashmla_backend_fp8_capabilities", || {
        // SAFETY: forwarded caller guarantee.
        let b = unsafe { backend_arg(backend) }?;
        let out = out_arg("out_caps", out_caps)?;
        let caps = &b.inner.capabilities().fp8;
        let mut c = flashmla_fp8_capabilities::default();
        for s in &caps.sparse {
            let code = flashmla_fp8_layout::of(s.layout) as usize;
            c.sparse_layouts |= 1 << code;
            c.sparse_features[code] = [
                (s.attn_sink, FLASHMLA_SPARSE_ATTN_SINK),
                (s.topk_length, FLASHMLA_SPARSE_TOPK_LENGTH),
                (s.extra_cache, FLASHMLA_SPARSE_EXTRA_CACHE),
                (s.extra_topk_length, FLASHMLA_SPARSE_EXTRA_TOPK_LENGTH),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .fold(0, |m, (_, bit)| m | bit);
        }
        for &l in &caps.dense {
            c.dense_layouts |= 1 << flashmla_fp8_layout::of(l) as u32;
        }
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { out.write(c) };
        Ok(())
    })
}

/// Rows of `tile_scheduler_metadata` for a decode over an FP8 cache with `s_q` query tokens and `h_q` heads.
///
/// # Safety
/// `backend` is NULL or a live handle; `out_num_sm_parts` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_fp8_num_sm_parts(
    backend: *const flashmla_backend,
    s_q: i64,
    h_q: i64,
    out_num_sm_parts: *mut i64,
) -> flashmla_status {
    boundary("flashmla_fp8_num_sm_parts", || {
        // SAFETY: forwarded caller guarantee.
        let b = unsafe { backend_arg(backend) }?;
        let (s_q, h_q) = (count_arg("s_q", s_q)?, count_arg("h_q", h_q)?);
        let out = out_arg("out_num_sm_parts", out_num_sm_parts)?;
        let parts = to_i64("num_sm_parts", b.inner.fp8_num_sm_parts(s_q, h_q))?;
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { out.write(parts) };
        Ok(())
    })
}

/// Bytes of workspace `flashmla_fp8_decode` needs (0 on the CPU backend, which keeps no partials).
///
/// # Safety
/// `backend` is NULL or a live handle; `out_bytes` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_fp8_workspace_size(
    backend: *const flashmla_backend,
    batch: i64,
    s_q: i64,
    h_q: i64,
    out_bytes: *mut i64,
) -> flashmla_status {
    boundary("flashmla_fp8_workspace_size", || {
        // SAFETY: forwarded caller guarantee.
        let b = unsafe { backend_arg(backend) }?;
        let shape =
            Fp8Shape { batch: count_arg("batch", batch)?, s_q: count_arg("s_q", s_q)?, h_q: count_arg("h_q", h_q)? };
        let out = out_arg("out_bytes", out_bytes)?;
        let bytes = to_i64("workspace size", b.inner.fp8_workspace_size(&shape)?)?;
        // SAFETY: non-null, and the caller guarantees it is writable.
        unsafe { out.write(bytes) };
        Ok(())
    })
}

/// The scheduler step of a decode over an FP8 cache: from the decode's own parameters, reads the lengths that fix
/// each request's work (`topk_length` / `extra_topk_length`, or `cache_seqlens` in dense mode) and writes
/// `tile_scheduler_metadata` and `num_splits`. Reuse the result while the shapes and those lengths stay the same
/// (the CPU backend rejects a stale one). On a GPU this only enqueues work on `stream`.
///
/// # Safety
/// `backend` is NULL or a live handle; `params` is NULL or readable, each of its tensor pointers NULL or a
/// descriptor of memory valid for its shape and strides (writable for the two metadata outputs).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_fp8_get_metadata(
    backend: *const flashmla_backend,
    params: *const flashmla_fp8_decode_params,
    stream: flashmla_stream,
) -> flashmla_status {
    boundary("flashmla_fp8_get_metadata", || {
        // SAFETY: forwarded caller guarantees; `stream` is NULL or a live stream, per this function's contract.
        let (b, args, stream) = unsafe { (backend_arg(backend)?, params_arg(params)?, Stream::from_raw(stream)) };
        // `MlaBackend::fp8_get_metadata` validates every argument once, before any backend touches memory.
        b.inner.fp8_get_metadata(&args, stream)
    })
}

/// The decode step over an FP8 cache (see `flashmla_fp8_decode_params`), writing `out` and `lse`. `workspace` is
/// caller-owned device memory of at least `flashmla_fp8_workspace_size` bytes (NULL when that is 0). On a GPU the
/// call only enqueues work on `stream`. On any error status nothing has been written to `out` or `lse`.
///
/// # Safety
/// As `flashmla_fp8_get_metadata` (`out` and `lse` writable); `workspace` is valid for `workspace_bytes` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_fp8_decode(
    backend: *const flashmla_backend,
    params: *const flashmla_fp8_decode_params,
    workspace: *mut c_void,
    workspace_bytes: i64,
    stream: flashmla_stream,
) -> flashmla_status {
    boundary("flashmla_fp8_decode", || {
        // SAFETY: forwarded caller guarantees.
        let (b, args) = unsafe { (backend_arg(backend)?, params_arg(params)?) };
        // Only the integer conversion happens here: `MlaBackend::fp8_decode` validates the arguments and the
        // workspace (size, address, device, no overlap) once, before any backend touches memory.
        let bytes = size_arg("workspace_bytes", workspace_bytes)?;
        // SAFETY: the caller guarantees `workspace` valid for `workspace_bytes` bytes of the backend's device for
        // the call (and a live stream, or NULL), per this function's contract.
        let (workspace, stream) =
            unsafe { (Workspace::from_raw(workspace, bytes, b.inner.capabilities().device), Stream::from_raw(stream)) };
        b.inner.fp8_decode(&args, workspace, stream)
    })
}

/// Quantises a host cache: `values [num_blocks, page_size, 1, d_qk]` (f32 or bf16) into `cache [num_blocks,
/// page_size, 1, bytes_per_token]` (u8 or e4m3; the layout from `bytes_per_token`), exactly as upstream's
/// `quantize_k_cache` (docs/sparse-fp8.md). Bytes between page blocks are left as they are.
///
/// Both tensors are validated first (`cache` as `k_cache` is; tensors that overlap are rejected); on an error
/// nothing has been written.
///
/// # Safety
/// Both pointers are NULL or readable descriptors of host memory valid for their shapes and strides (`cache`
/// writable) for the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_fp8_quantize(
    values: *const flashmla_tensor,
    cache: *const flashmla_tensor,
) -> flashmla_status {
    boundary("flashmla_fp8_quantize", || {
        // SAFETY: forwarded caller guarantee.
        let (v, c) = unsafe { (tensor_arg("values", values)?, tensor_arg("cache", cache)?) };
        // `quantize_tensor` validates both tensors (shapes, dtypes, strides, host memory, no overlap) first.
        mla_core::fp8::quantize_tensor(&v, &c)
    })
}

/// Dequantises a host cache into `values [num_blocks, page_size, 1, d_qk]` (f32 or bf16; exact for bf16: every
/// dequantised value is a bfloat16).
///
/// # Safety
/// As `flashmla_fp8_quantize`, with `values` writable instead of `cache`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flashmla_fp8_dequantize(
    cache: *const flashmla_tensor,
    values: *const flashmla_tensor,
) -> flashmla_status {
    boundary("flashmla_fp8_dequantize", || {
        // SAFETY: forwarded caller guarantee.
        let (c, v) = unsafe { (tensor_arg("cache", cache)?, tensor_arg("values", values)?) };
        // `dequantize_tensor` validates both tensors (shapes, dtypes, strides, host memory, no overlap) first.
        mla_core::fp8::dequantize_tensor(&c, &v)
    })
}
