//! Tensor descriptors (DLPack-shaped) and safe typed host views.
//!
//! A [`TensorDesc`] is what crosses every boundary: a data pointer, an element type, up to four dimensions with
//! strides counted in elements (as DLPack's `DLTensor`), and the device the memory lives on. It owns nothing and
//! checks nothing by itself; [`crate::validate`] checks a whole problem at once.
//!
//! Rust callers with host data should build descriptors through [`HostTensor`] / [`HostTensorMut`], which borrow a
//! slice and check that every addressed element lies inside it.

use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;

use crate::dtype::{E4M3, ScalarType};
use crate::error::{Error, Result};

/// Most dimensions any tensor of the API has.
pub const MAX_NDIM: usize = 4;

/// Where a tensor's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Ordinary host memory.
    Host,
    /// Device memory of the CUDA device with this ordinal.
    Cuda(i32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Host => f.write_str("host"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A strided view of memory owned by someone else.
#[derive(Clone, Copy, Debug)]
pub struct TensorDesc {
    /// Address of element `[0, 0, …]`.
    pub data: *mut c_void,
    /// Element type.
    pub dtype: ScalarType,
    /// Number of dimensions in use (`shape[..ndim]`).
    pub ndim: usize,
    /// Extents; entries past `ndim` are ignored.
    pub shape: [i64; MAX_NDIM],
    /// Strides in elements; entries past `ndim` are ignored.
    pub strides: [i64; MAX_NDIM],
    /// Where the memory lives.
    pub device: Device,
}

// SAFETY: a descriptor is a plain address plus metadata; it grants no access by itself. Whoever dereferences it
// (a backend, after validation) is responsible for synchronisation, exactly as with a DLPack tensor.
unsafe impl Send for TensorDesc {}
// SAFETY: as above; shared references only read the metadata.
unsafe impl Sync for TensorDesc {}

impl TensorDesc {
    /// A descriptor with explicit strides. Fails if more than [`MAX_NDIM`] dimensions or mismatched lengths.
    pub fn new(data: *mut c_void, dtype: ScalarType, shape: &[i64], strides: &[i64], device: Device) -> Result<Self> {
        if shape.len() > MAX_NDIM || shape.len() != strides.len() {
            return Err(Error::invalid(
                "tensor.ndim",
                format!("at most {MAX_NDIM} dims with one stride each"),
                format!("{} dims and {} strides", shape.len(), strides.len()),
            ));
        }
        let mut d = TensorDesc { data, dtype, ndim: shape.len(), shape: [0; MAX_NDIM], strides: [0; MAX_NDIM], device };
        d.shape[..shape.len()].copy_from_slice(shape);
        d.strides[..strides.len()].copy_from_slice(strides);
        Ok(d)
    }

    /// A row-major contiguous descriptor.
    pub fn contiguous(data: *mut c_void, dtype: ScalarType, shape: &[i64], device: Device) -> Result<Self> {
        let strides = contiguous_strides(shape);
        Self::new(data, dtype, shape, &strides[..shape.len()], device)
    }

    /// The used part of `shape`.
    pub fn dims(&self) -> &[i64] {
        &self.shape[..self.ndim]
    }

    /// The used part of `strides`.
    pub fn stride_slice(&self) -> &[i64] {
        &self.strides[..self.ndim]
    }

    /// Number of elements (0 if any extent is 0 or negative).
    pub fn numel(&self) -> i64 {
        self.dims().iter().map(|&d| d.max(0)).product()
    }

    /// Row-major contiguous?
    pub fn is_contiguous(&self) -> bool {
        let want = contiguous_strides(self.dims());
        self.dims().iter().zip(self.stride_slice()).zip(want).all(|((&d, &s), w)| d <= 1 || s == w)
    }

    /// One past the largest element offset addressed (0 for an empty tensor), or `None` on overflow or a negative
    /// extent/stride.
    pub fn extent_elements(&self) -> Option<i64> {
        let mut last: i64 = 0;
        for (&d, &s) in self.dims().iter().zip(self.stride_slice()) {
            if d < 0 || s < 0 {
                return None;
            }
            if d == 0 {
                return Some(0);
            }
            last = last.checked_add((d - 1).checked_mul(s)?)?;
        }
        last.checked_add(1)
    }

    /// Formats the shape as `[a, b, c]` for messages.
    pub fn shape_string(&self) -> String {
        format!("{:?}", self.dims())
    }
}

/// Row-major strides for `shape` (unused tail entries are 0).
pub fn contiguous_strides(shape: &[i64]) -> [i64; MAX_NDIM] {
    let mut s = [0i64; MAX_NDIM];
    let mut acc = 1i64;
    for i in (0..shape.len().min(MAX_NDIM)).rev() {
        s[i] = acc;
        acc = acc.saturating_mul(shape[i].max(1));
    }
    s
}

/// Element types a host view can hold.
pub trait Element: Copy + Send + Sync + 'static {
    /// The matching scalar type.
    const SCALAR: ScalarType;
}

impl Element for half::bf16 {
    const SCALAR: ScalarType = ScalarType::Bf16;
}
impl Element for half::f16 {
    const SCALAR: ScalarType = ScalarType::F16;
}
impl Element for E4M3 {
    const SCALAR: ScalarType = ScalarType::E4M3;
}
impl Element for f32 {
    const SCALAR: ScalarType = ScalarType::F32;
}
impl Element for i32 {
    const SCALAR: ScalarType = ScalarType::I32;
}
impl Element for u8 {
    const SCALAR: ScalarType = ScalarType::U8;
}

fn host_desc<T: Element>(ptr: *mut T, len: usize, shape: &[usize], strides: Option<&[usize]>) -> Result<TensorDesc> {
    let shape_i: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let strides_i: Vec<i64> = match strides {
        Some(s) => s.iter().map(|&d| d as i64).collect(),
        None => contiguous_strides(&shape_i)[..shape.len()].to_vec(),
    };
    let desc = TensorDesc::new(ptr.cast(), T::SCALAR, &shape_i, &strides_i, Device::Host)?;
    let extent = desc
        .extent_elements()
        .ok_or_else(|| Error::invalid("host view", "a shape whose extent fits in i64", desc.shape_string()))?;
    if extent as u128 > len as u128 {
        return Err(Error::invalid(
            "host view",
            format!("a slice of at least {extent} elements for shape {shape:?}"),
            format!("{len} elements"),
        ));
    }
    Ok(desc)
}

/// A read-only tensor borrowed from a host slice; every addressed element is inside the slice.
#[derive(Clone, Copy, Debug)]
pub struct HostTensor<'a> {
    desc: TensorDesc,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> HostTensor<'a> {
    /// Row-major view of `data` with this shape.
    pub fn new<T: Element>(data: &'a [T], shape: &[usize]) -> Result<Self> {
        Self::strided(data, shape, None)
    }

    /// View with explicit element strides (`None`: row-major).
    pub fn strided<T: Element>(data: &'a [T], shape: &[usize], strides: Option<&[usize]>) -> Result<Self> {
        let desc = host_desc(data.as_ptr().cast_mut(), data.len(), shape, strides)?;
        Ok(HostTensor { desc, _borrow: PhantomData })
    }

    /// The descriptor to pass to a backend.
    pub fn desc(&self) -> TensorDesc {
        self.desc
    }
}

/// A writable tensor borrowed from a host slice; every addressed element is inside the slice.
#[derive(Debug)]
pub struct HostTensorMut<'a> {
    desc: TensorDesc,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> HostTensorMut<'a> {
    /// Row-major view of `data` with this shape.
    pub fn new<T: Element>(data: &'a mut [T], shape: &[usize]) -> Result<Self> {
        Self::strided(data, shape, None)
    }

    /// View with explicit element strides (`None`: row-major).
    pub fn strided<T: Element>(data: &'a mut [T], shape: &[usize], strides: Option<&[usize]>) -> Result<Self> {
        let desc = host_desc(data.as_mut_ptr(), data.len(), shape, strides)?;
        Ok(HostTensorMut { desc, _borrow: PhantomData })
    }

    /// The descriptor to pass to a backend.
    pub fn desc(&self) -> TensorDesc {
        self.desc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_views_check_bounds() {
        let v = vec![0f32; 24];
        let t = HostTensor::new(&v, &[2, 3, 4]).unwrap();
        assert_eq!(t.desc().stride_slice(), &[12, 4, 1]);
        assert!(t.desc().is_contiguous());
        assert!(HostTensor::new(&v, &[5, 5]).is_err());
        let s = HostTensor::strided(&v, &[2, 4], Some(&[12, 1])).unwrap();
        assert!(!s.desc().is_contiguous());
        assert_eq!(s.desc().extent_elements(), Some(16));
        let err = HostTensor::strided(&v, &[3, 4], Some(&[12, 1])).unwrap_err();
        assert!(err.to_string().contains("at least 28 elements"), "{err}");
    }

    #[test]
    fn extent_detects_overflow_and_negatives() {
        let d = TensorDesc::new(std::ptr::null_mut(), ScalarType::F32, &[i64::MAX, 2], &[2, 1], Device::Host).unwrap();
        assert_eq!(d.extent_elements(), None);
        let d = TensorDesc::new(std::ptr::null_mut(), ScalarType::F32, &[3], &[-1], Device::Host).unwrap();
        assert_eq!(d.extent_elements(), None);
        let d = TensorDesc::new(std::ptr::null_mut(), ScalarType::F32, &[0, 7], &[7, 1], Device::Host).unwrap();
        assert_eq!(d.extent_elements(), Some(0));
    }
}
