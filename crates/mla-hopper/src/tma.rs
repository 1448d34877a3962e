//! The TMA tensor map over the paged KV cache (encoded on the host per call: no allocation, no device work).
//!
//! | dim (innermost first) | extent | stride (bytes) | box |
//! |---|---|---|---|
//! | 0: column | 576 | 1 element | 64 (16-bit) / 128 (e4m3): 128 bytes, one SW128 row; e4m3 tail map: 64, SW64 |
//! | 1: kv head | h_kv | `k_cache.strides[2]` | 1 |
//! | 2: token in page | 64 | `k_cache.strides[1]` | 64 |
//! | 3: page | num_blocks | `k_cache.strides[0]` | 1 |
//!
//! A page of one KV head is 9 boxes (e4m3: 4 SW128 boxes of 128 columns plus one SW64 box of the 64 RoPE columns
//! from a second map). Page ids outside `[0, num_blocks)` are out of bounds, which TMA fills with zeros, so a
//! garbage id can never fault.

use cudarc::driver::sys;

use crate::error::{HopperError, check};

/// TMA requires global strides that are multiples of this, and a 16-byte aligned base.
pub(crate) const TMA_ALIGN: u64 = 16;

/// A 128-byte tensor map that travels to the kernel as a `__grid_constant__` parameter.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct TensorMap(pub sys::CUtensorMap);

/// Geometry of the paged cache for [`encode_kv_map`].
pub(crate) struct KvGeometry {
    pub base: u64,
    pub elem_bytes: u64,
    pub num_blocks: u64,
    pub page_size: u64,
    pub h_kv: u64,
    /// Element strides of `[num_blocks, page_size, h_kv]`.
    pub strides: [i64; 3],
}

/// Which boxes a map serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvBox {
    /// 128-byte rows, 128-byte swizzle (16-bit: 64 columns; e4m3: 128 columns).
    Main,
    /// e4m3 only: the 64 RoPE columns as 64-byte rows, 64-byte swizzle.
    E4m3Tail,
}

/// Encodes a K map. Strides of unit dimensions are irrelevant to TMA but must still be valid, so they are
/// replaced by a legal value.
pub(crate) fn encode_kv_map(g: &KvGeometry, which: KvBox) -> Result<TensorMap, HopperError> {
    let (cols_per_box, dtype, swizzle) = match (g.elem_bytes, which) {
        (1, KvBox::Main) => (
            128u32,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        ),
        (1, KvBox::E4m3Tail) => (
            64u32,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        ),
        _ => (
            64u32,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        ),
    };
    let row_bytes = 576 * g.elem_bytes;
    let stride = |s: i64, extent: u64| if extent <= 1 { row_bytes } else { s as u64 * g.elem_bytes };
    let dims: [u64; 4] = [576, g.h_kv, g.page_size, g.num_blocks];
    let strides: [u64; 3] =
        [stride(g.strides[2], g.h_kv), stride(g.strides[1], g.page_size), stride(g.strides[0], g.num_blocks)];
    let boxes: [u32; 4] = [cols_per_box, 1, g.page_size as u32, 1];
    let element_strides: [u32; 4] = [1; 4];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer refers to a live local array of the rank the call is told (4 dims, 3 strides); the map
    // is written by the driver into `map`, which is properly aligned (CUtensorMap is align(128)).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
            4,
            g.base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    check("cuTensorMapEncodeTiled", r)?;
    // SAFETY: the driver returned success, so it fully initialised the map.
    Ok(TensorMap(unsafe { map.assume_init() }))
}
