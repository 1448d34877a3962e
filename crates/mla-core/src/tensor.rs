//! Tensor descriptors (DLPack-shaped) and safe typed host views.
//!
//! A [`TensorDesc`] is what crosses every boundary: a data pointer, an element type, up to four dimensions with
//! strides counted in elements (as DLPack's `DLTensor`), and the device the memory lives on. It owns nothing and
//! checks nothing by itself; [`crate::validate_decode`] checks a whole problem at once.
//!
//! Rust callers with host data build descriptors through [`HostTensor`] / [`HostTensorMut`], which borrow a slice
//! and check that every addressed element lies inside it; everything else (device memory, C pointers) enters
//! through the `unsafe` [`TensorDesc::from_raw`] and its contract.

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

/// A strided view of memory owned by someone else, valid for the lifetime `'a`; usable on the thread that made it.
///
/// A descriptor can only be made in two ways: safely from a borrowed host slice ([`HostTensor`],
/// [`HostTensorMut`]), whose borrow `'a` keeps the memory alive and checked in bounds; or through the `unsafe`
/// constructors [`TensorDesc::from_raw`] / [`TensorDesc::from_raw_contiguous`], whose caller promises the same
/// (the natural boundary of the C ABI and of device memory). Its fields are private, so safe code can neither make
/// one from an address nor point an existing one elsewhere; every backend can therefore dereference a descriptor
/// that [`crate::validate_decode`] accepted.
#[derive(Clone, Copy, Debug)]
pub struct TensorDesc<'a> {
    /// Address of element `[0, 0, …]`.
    data: *mut c_void,
    /// Element type.
    dtype: ScalarType,
    /// Number of dimensions in use (`shape[..ndim]`).
    ndim: usize,
    /// Extents; entries past `ndim` are 0.
    shape: [i64; MAX_NDIM],
    /// Strides in elements; entries past `ndim` are 0.
    strides: [i64; MAX_NDIM],
    /// Where the memory lives.
    device: Device,
    /// May a backend write through it? False for views of shared borrows ([`HostTensor`]); validation refuses
    /// such a descriptor as an output.
    writable: bool,
    _memory: PhantomData<&'a ()>,
}

// Deliberately neither `Send` nor `Sync` (the raw pointer field opts out): a descriptor is `Copy`, so a writable one
// shared with or copied to another thread could be handed to two concurrent calls, which would then write the same
// memory at once, a data race in safe code. A caller that has made sure no two calls overlap (the C ABI's and the
// Python extension's callers promise it) may wrap its arguments in its own `Send` type, with a `// SAFETY:` saying
// why; backends that fan a call out over threads do the same internally.

impl<'a> TensorDesc<'a> {
    /// A descriptor with explicit strides, from an address. Fails if more than [`MAX_NDIM`] dimensions or
    /// mismatched lengths. Nothing else is checked here: [`crate::validate_decode`] checks a whole problem at once.
    ///
    /// # Safety
    /// Unless the descriptor is only inspected and never passed to a backend, for all of `'a`:
    /// - every element addressed by `shape` and `strides` (offsets `Σ index_i · stride_i` elements of `dtype` from
    ///   `data`) lies in one allocation on `device` that stays live and is valid for reads;
    /// - if the descriptor is passed as an output (`out`, `lse`, `tile_scheduler_metadata`, `num_splits`), that
    ///   memory is also valid for writes, and nothing else reads or writes it during the call;
    /// - on a CUDA device, the memory belongs to the context the backend runs in (or is accessible from it).
    pub unsafe fn from_raw(
        data: *mut c_void,
        dtype: ScalarType,
        shape: &[i64],
        strides: &[i64],
        device: Device,
    ) -> Result<Self> {
        Self::build(data, dtype, shape, strides, device, true)
    }

    /// A row-major contiguous descriptor, from an address.
    ///
    /// # Safety
    /// As [`TensorDesc::from_raw`], with row-major strides.
    pub unsafe fn from_raw_contiguous(
        data: *mut c_void,
        dtype: ScalarType,
        shape: &[i64],
        device: Device,
    ) -> Result<Self> {
        let strides = contiguous_strides(shape);
        let n = shape.len().min(MAX_NDIM);
        Self::build(data, dtype, shape, &strides[..n], device, true)
    }

    fn build(
        data: *mut c_void,
        dtype: ScalarType,
        shape: &[i64],
        strides: &[i64],
        device: Device,
        writable: bool,
    ) -> Result<Self> {
        if shape.len() > MAX_NDIM || shape.len() != strides.len() {
            return Err(Error::invalid(
                "tensor.ndim",
                format!("at most {MAX_NDIM} dims with one stride each"),
                format!("{} dims and {} strides", shape.len(), strides.len()),
            ));
        }
        let mut d = TensorDesc {
            data,
            dtype,
            ndim: shape.len(),
            shape: [0; MAX_NDIM],
            strides: [0; MAX_NDIM],
            device,
            writable,
            _memory: PhantomData,
        };
        d.shape[..shape.len()].copy_from_slice(shape);
        d.strides[..strides.len()].copy_from_slice(strides);
        Ok(d)
    }

    /// Address of element `[0, 0, …]` (reading the address is safe; dereferencing it is the backend's business).
    pub fn data(&self) -> *mut c_void {
        self.data
    }

    /// Element type.
    pub fn dtype(&self) -> ScalarType {
        self.dtype
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.ndim
    }

    /// Where the memory lives.
    pub fn device(&self) -> Device {
        self.device
    }

    /// May a backend write through this descriptor? (False for [`HostTensor`] views.)
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The same view without write permission (validation then refuses it as an output). Safe: it only takes a
    /// permission away, for views of shared borrows made through [`TensorDesc::from_raw`] (device memory).
    pub fn read_only(mut self) -> Self {
        self.writable = false;
        self
    }

    /// The extents (`ndim` of them).
    pub fn dims(&self) -> &[i64] {
        &self.shape[..self.ndim]
    }

    /// The strides in elements (`ndim` of them).
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

    /// The addressed bytes `[start, end)` (empty for an empty tensor), or `None` on overflow or a negative
    /// extent/stride.
    pub fn byte_range(&self) -> Option<(usize, usize)> {
        let bytes = self.extent_elements()?.checked_mul(self.dtype.size_bytes() as i64)?;
        let start = self.data as usize;
        Some((start, start.checked_add(usize::try_from(bytes).ok()?)?))
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
/// Raw bytes are described as E4M3, the element type of an FP8 KV cache ([`crate::fp8`]): what the API takes
/// bytes for. (A separate `u8` scalar type would be one more variant for every exhaustive match on [`ScalarType`];
/// the C ABI's `FLASHMLA_DTYPE_U8` maps onto E4M3 the same way.)
impl Element for u8 {
    const SCALAR: ScalarType = ScalarType::E4M3;
}

/// A descriptor of `len` elements at `ptr`, checked to address only those. The caller ties it to its borrow.
fn host_desc<'a, T: Element>(
    ptr: *mut T,
    len: usize,
    shape: &[usize],
    strides: Option<&[usize]>,
    writable: bool,
) -> Result<TensorDesc<'a>> {
    let shape_i: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let strides_i: Vec<i64> = match strides {
        Some(s) => s.iter().map(|&d| d as i64).collect(),
        None => contiguous_strides(&shape_i)[..shape.len()].to_vec(),
    };
    let desc = TensorDesc::build(ptr.cast(), T::SCALAR, &shape_i, &strides_i, Device::Host, writable)?;
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

/// A read-only tensor borrowed from a host slice; every addressed element is inside the slice, and its descriptor
/// cannot outlive the borrow.
#[derive(Clone, Copy, Debug)]
pub struct HostTensor<'a> {
    desc: TensorDesc<'a>,
}

impl<'a> HostTensor<'a> {
    /// Row-major view of `data` with this shape.
    pub fn new<T: Element>(data: &'a [T], shape: &[usize]) -> Result<Self> {
        Self::strided(data, shape, None)
    }

    /// View with explicit element strides (`None`: row-major).
    pub fn strided<T: Element>(data: &'a [T], shape: &[usize], strides: Option<&[usize]>) -> Result<Self> {
        let desc = host_desc(data.as_ptr().cast_mut(), data.len(), shape, strides, false)?;
        Ok(HostTensor { desc })
    }

    /// The descriptor to pass to a backend (read-only: refused as an output).
    pub fn desc(&self) -> TensorDesc<'a> {
        self.desc
    }
}

/// A writable tensor borrowed from a host slice; every addressed element is inside the slice, and its descriptor
/// cannot outlive the borrow.
#[derive(Debug)]
pub struct HostTensorMut<'a> {
    desc: TensorDesc<'a>,
}

impl<'a> HostTensorMut<'a> {
    /// Row-major view of `data` with this shape.
    pub fn new<T: Element>(data: &'a mut [T], shape: &[usize]) -> Result<Self> {
        Self::strided(data, shape, None)
    }

    /// View with explicit element strides (`None`: row-major).
    pub fn strided<T: Element>(data: &'a mut [T], shape: &[usize], strides: Option<&[usize]>) -> Result<Self> {
        let desc = host_desc(data.as_mut_ptr(), data.len(), shape, strides, true)?;
        Ok(HostTensorMut { desc })
    }

    /// The descriptor to pass to a backend (writable). Validation refuses an output that overlaps any other tensor
    /// of the call, so copies of it cannot alias.
    pub fn desc(&self) -> TensorDesc<'a> {
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

    /// A descriptor that is only inspected, never passed to a backend.
    fn inspect(shape: &[i64], strides: &[i64]) -> TensorDesc<'static> {
        // SAFETY: the descriptor is never dereferenced (only its extent is computed).
        unsafe { TensorDesc::from_raw(std::ptr::null_mut(), ScalarType::F32, shape, strides, Device::Host) }.unwrap()
    }

    #[test]
    fn extent_detects_overflow_and_negatives() {
        assert_eq!(inspect(&[i64::MAX, 2], &[2, 1]).extent_elements(), None);
        assert_eq!(inspect(&[3], &[-1]).extent_elements(), None);
        assert_eq!(inspect(&[0, 7], &[7, 1]).extent_elements(), Some(0));
        assert_eq!(inspect(&[2, 3], &[3, 1]).byte_range(), Some((0, 24)));
    }

    #[test]
    fn shared_views_are_read_only() {
        let mut v = vec![0f32; 6];
        assert!(!HostTensor::new(&v, &[6]).unwrap().desc().is_writable());
        assert!(HostTensorMut::new(&mut v, &[2, 3]).unwrap().desc().is_writable());
        let d = inspect(&[2, 3], &[3, 1]);
        assert!(d.is_writable() && !d.read_only().is_writable());
        assert_eq!(d.read_only().dims(), d.dims());
    }
}
