//! `flashmla_tensor`: the DLPack-shaped descriptor every tensor argument is passed as, and its checked
//! conversion to [`mla_core::TensorDesc`].
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `data` | `void*` | address of element `[0, 0, …]` (host or device memory) |
//! | `device_type` | `int32_t` | DLPack `DLDeviceType`: `kDLCPU = 1`, `kDLCUDA = 2` |
//! | `device_id` | `int32_t` | 0 for the CPU, the CUDA ordinal otherwise |
//! | `dtype` | `int32_t` | a `flashmla_dtype` code (not DLPack's `DLDataType`, see below) |
//! | `ndim` | `int32_t` | dimensions used, 0 to 4 |
//! | `shape[4]`, `strides[4]` | `int64_t` | extents and strides **in elements**, as DLPack; entries past `ndim` ignored |
//!
//! Every field is a plain integer or pointer, so any bit pattern a caller (or ctypes) writes is safe to read here;
//! the enum-like fields are decoded with checks, never transmuted. The dtype is our own small code rather than a
//! `DLDataType` triple so that a caller cannot express lanes or bit widths we do not support; the mapping is
//! `BF16 = (kDLBfloat, 16, 1)`, `FP16 = (kDLFloat, 16, 1)`, `E4M3 = (kDLFloat8_e4m3fn, 8, 1)`,
//! `F32 = (kDLFloat, 32, 1)`, `I32 = (kDLInt, 32, 1)`, `U8 = (kDLUInt, 8, 1)`.

use std::ffi::c_void;

use mla_core::{Device, Error, Result, ScalarType, TensorDesc};

/// Most dimensions a tensor of this API has (the length of `shape` and `strides`).
pub const FLASHMLA_MAX_NDIM: usize = 4;

const _: () = assert!(FLASHMLA_MAX_NDIM == mla_core::tensor::MAX_NDIM);

/// Element type codes for `flashmla_tensor.dtype`. Code 0 is deliberately invalid, so a zeroed descriptor is
/// rejected with a clear message.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum flashmla_dtype {
    /// bfloat16 (inputs, and the output for bf16 and e4m3 inputs).
    BF16 = 1,
    /// IEEE binary16 (inputs, and the output for fp16 inputs).
    FP16 = 2,
    /// FP8 E4M3FN (inputs only; needs `descale_q` and `descale_k`).
    E4M3 = 3,
    /// IEEE binary32 (`lse`, descales).
    F32 = 4,
    /// 32-bit signed integer (`block_table`, `cache_seqlens`, scheduler metadata, sparse indices).
    I32 = 5,
    /// Raw bytes: an FP8 KV cache (`k_cache` / `extra_k_cache` of the `flashmla_fp8_*` calls). The library reads
    /// them as `FLASHMLA_DTYPE_E4M3` (the two codes are interchangeable, and error messages name the dtype
    /// `e4m3`). Since ABI version 2.
    U8 = 6,
}

/// Every dtype code, in order (private: cbindgen would export a public array as a broken macro).
const ALL_DTYPES: [flashmla_dtype; 6] = [
    flashmla_dtype::BF16,
    flashmla_dtype::FP16,
    flashmla_dtype::E4M3,
    flashmla_dtype::F32,
    flashmla_dtype::I32,
    flashmla_dtype::U8,
];

impl flashmla_dtype {
    /// Decodes a raw code.
    pub fn from_code(code: i32) -> Option<Self> {
        ALL_DTYPES.into_iter().find(|d| *d as i32 == code)
    }

    /// The core scalar type.
    pub const fn scalar(self) -> ScalarType {
        match self {
            flashmla_dtype::BF16 => ScalarType::Bf16,
            flashmla_dtype::FP16 => ScalarType::F16,
            flashmla_dtype::E4M3 => ScalarType::E4M3,
            flashmla_dtype::F32 => ScalarType::F32,
            flashmla_dtype::I32 => ScalarType::I32,
            // Bytes are described as E4M3 in the core (`mla_core::Element for u8`).
            flashmla_dtype::U8 => ScalarType::E4M3,
        }
    }

    /// The code of a core scalar type (never `U8`: the core describes bytes as E4M3).
    pub const fn of_scalar(s: ScalarType) -> Self {
        match s {
            ScalarType::Bf16 => flashmla_dtype::BF16,
            ScalarType::F16 => flashmla_dtype::FP16,
            ScalarType::E4M3 => flashmla_dtype::E4M3,
            ScalarType::F32 => flashmla_dtype::F32,
            ScalarType::I32 => flashmla_dtype::I32,
        }
    }
}

/// Device type codes for `flashmla_tensor.device_type`: the values of DLPack's `DLDeviceType`.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum flashmla_device_type {
    /// Host memory (`kDLCPU`).
    CPU = 1,
    /// CUDA device memory (`kDLCUDA`).
    CUDA = 2,
}

/// A strided view of caller-owned memory, laid out like DLPack's `DLTensor` minus `byte_offset` (add it to `data`).
///
/// The library never keeps the pointer past the call it is passed to (on GPU backends: past the work enqueued on
/// the call's stream).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct flashmla_tensor {
    /// Address of element `[0, 0, ...]`; may be NULL only when the tensor has no elements.
    pub data: *mut c_void,
    /// A `flashmla_device_type` code (DLPack `DLDeviceType`).
    pub device_type: i32,
    /// 0 for the CPU; the CUDA device ordinal otherwise.
    pub device_id: i32,
    /// A `flashmla_dtype` code.
    pub dtype: i32,
    /// Number of dimensions used, 0 to `FLASHMLA_MAX_NDIM`.
    pub ndim: i32,
    /// Extents; entries past `ndim` are ignored.
    pub shape: [i64; FLASHMLA_MAX_NDIM],
    /// Strides in elements (not bytes); entries past `ndim` are ignored.
    pub strides: [i64; FLASHMLA_MAX_NDIM],
}

// The layout bindings rely on (the static asserts of tests/c/abi_test.c, the plugin host of tests/common).
const _: () = assert!(std::mem::size_of::<flashmla_tensor>() == 88);
const _: () = assert!(std::mem::offset_of!(flashmla_tensor, shape) == 24);

impl flashmla_tensor {
    /// The descriptor of a core tensor (for Rust callers and tests).
    pub fn from_desc(d: &TensorDesc) -> Self {
        let (device_type, device_id) = match d.device() {
            Device::Host => (flashmla_device_type::CPU as i32, 0),
            Device::Cuda(i) => (flashmla_device_type::CUDA as i32, i),
        };
        let (mut shape, mut strides) = ([0; FLASHMLA_MAX_NDIM], [0; FLASHMLA_MAX_NDIM]);
        shape[..d.ndim()].copy_from_slice(d.dims());
        strides[..d.ndim()].copy_from_slice(d.stride_slice());
        flashmla_tensor {
            data: d.data(),
            device_type,
            device_id,
            dtype: flashmla_dtype::of_scalar(d.dtype()) as i32,
            ndim: d.ndim() as i32,
            shape,
            strides,
        }
    }

    /// Checks the fields this layer owns (ndim, dtype code, device) and converts; `name` is the argument's name.
    /// Shapes, strides and pointers are checked once, by [`mla_core::MlaBackend::decode`] and friends.
    ///
    /// # Safety
    /// As [`TensorDesc::from_raw`] for `'a`: the memory this descriptor describes is live and valid for reads (and
    /// for writes if it is passed as an output) until the call using it returns (on a GPU: until the work
    /// enqueued by it has finished). This is the C caller's contract, stated on every function of the ABI.
    pub unsafe fn to_desc<'a>(&self, name: &str) -> Result<TensorDesc<'a>> {
        let ndim = usize::try_from(self.ndim)
            .ok()
            .filter(|n| *n <= FLASHMLA_MAX_NDIM)
            .ok_or_else(|| Error::invalid(format!("{name}.ndim"), format!("0 to {FLASHMLA_MAX_NDIM}"), self.ndim))?;
        let dtype = flashmla_dtype::from_code(self.dtype).ok_or_else(|| {
            Error::invalid(format!("{name}.dtype"), "a flashmla_dtype code (1 = BF16 ... 6 = U8)", self.dtype)
        })?;
        let device = match self.device_type {
            t if t == flashmla_device_type::CPU as i32 => {
                if self.device_id != 0 {
                    return Err(Error::invalid(format!("{name}.device_id"), "0 for a CPU tensor", self.device_id));
                }
                Device::Host
            }
            t if t == flashmla_device_type::CUDA as i32 => {
                if self.device_id < 0 {
                    return Err(Error::invalid(format!("{name}.device_id"), "a CUDA ordinal >= 0", self.device_id));
                }
                Device::Cuda(self.device_id)
            }
            other => {
                return Err(Error::invalid(format!("{name}.device_type"), "1 (kDLCPU) or 2 (kDLCUDA)", other));
            }
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { TensorDesc::from_raw(self.data, dtype.scalar(), &self.shape[..ndim], &self.strides[..ndim], device) }
    }
}

/// Reads and converts a required tensor argument.
///
/// # Safety
/// `t` is NULL or points to a readable `flashmla_tensor` that satisfies [`flashmla_tensor::to_desc`]'s contract
/// for `'a`.
pub(crate) unsafe fn tensor_arg<'a>(name: &str, t: *const flashmla_tensor) -> Result<TensorDesc<'a>> {
    // SAFETY: the caller guarantees `t` is NULL or valid; every bit pattern of the plain fields is a valid value.
    match unsafe { t.as_ref() } {
        // SAFETY: forwarded caller guarantee about the described memory.
        Some(t) => unsafe { t.to_desc(name) },
        None => Err(Error::invalid(name, "a non-null flashmla_tensor pointer", "NULL")),
    }
}

/// Reads and converts an optional tensor argument (NULL means absent).
///
/// # Safety
/// As [`tensor_arg`].
pub(crate) unsafe fn optional_tensor_arg<'a>(name: &str, t: *const flashmla_tensor) -> Result<Option<TensorDesc<'a>>> {
    // SAFETY: as in `tensor_arg`.
    unsafe { t.as_ref() }.map(|t| unsafe { t.to_desc(name) }).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> flashmla_tensor {
        flashmla_tensor {
            data: std::ptr::null_mut(),
            device_type: 1,
            device_id: 0,
            dtype: 5,
            ndim: 1,
            shape: [3, 0, 0, 0],
            strides: [1, 0, 0, 0],
        }
    }

    /// Converts a descriptor that these tests only inspect.
    fn convert(t: flashmla_tensor) -> Result<TensorDesc<'static>> {
        // SAFETY: the descriptor is never passed to a backend, so its (null) memory is never touched.
        unsafe { t.to_desc("x") }
    }

    fn err(t: flashmla_tensor) -> String {
        convert(t).unwrap_err().to_string()
    }

    #[test]
    fn converts_and_round_trips() {
        let d = convert(t()).unwrap();
        assert_eq!((d.ndim(), d.dims(), d.dtype(), d.device()), (1, &[3i64][..], ScalarType::I32, Device::Host));
        let back = flashmla_tensor::from_desc(&d);
        assert_eq!((back.dtype, back.ndim, back.shape, back.strides), (5, 1, [3, 0, 0, 0], [1, 0, 0, 0]));
        let cuda = convert(flashmla_tensor { device_type: 2, device_id: 3, ..t() }).unwrap();
        assert_eq!(cuda.device(), Device::Cuda(3));
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        assert!(err(flashmla_tensor { ndim: -1, ..t() }).contains("`x.ndim`"));
        assert!(err(flashmla_tensor { ndim: 5, ..t() }).contains("`x.ndim`: expected 0 to 4, got 5"));
        assert!(err(flashmla_tensor { dtype: 0, ..t() }).contains("`x.dtype`"));
        assert!(err(flashmla_tensor { dtype: 7, ..t() }).contains("`x.dtype`"));
        assert!(err(flashmla_tensor { device_type: 3, ..t() }).contains("`x.device_type`"));
        assert!(err(flashmla_tensor { device_id: 1, ..t() }).contains("`x.device_id`"));
        assert!(err(flashmla_tensor { device_type: 2, device_id: -1, ..t() }).contains("`x.device_id`"));
        // SAFETY: NULL is allowed.
        let e = unsafe { tensor_arg("q", std::ptr::null()) }.unwrap_err().to_string();
        assert!(e.contains("`q`") && e.contains("NULL"), "{e}");
        // SAFETY: NULL is allowed.
        assert!(unsafe { optional_tensor_arg("d", std::ptr::null()) }.unwrap().is_none());
    }

    #[test]
    fn dtype_codes_round_trip() {
        for d in ALL_DTYPES {
            assert_eq!(flashmla_dtype::from_code(d as i32), Some(d));
            // U8 is read as E4M3 (raw cache bytes), so it comes back as E4M3.
            let back = if d == flashmla_dtype::U8 { flashmla_dtype::E4M3 } else { d };
            assert_eq!(flashmla_dtype::of_scalar(d.scalar()), back);
        }
        assert_eq!(flashmla_dtype::U8.scalar(), ScalarType::E4M3);
        assert_eq!(flashmla_dtype::from_code(0), None);
    }
}
