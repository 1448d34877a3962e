//! Safe views of device memory: descriptors over cudarc buffers, in the style of mla-core's host views.
//!
//! [`DeviceTensor`] (read-only), [`DeviceTensorMut`] (writable) and [`DeviceWorkspace`] borrow a cudarc
//! [`CudaSlice`] (or a [`CudaView`] / [`CudaViewMut`] of one) and check that every element the shape and strides
//! address lies inside it, so safe code cannot describe memory it does not own, or outlive it. The element type
//! follows from the buffer's (`CudaSlice<half::bf16>` is bf16, `CudaSlice<u8>` is e4m3 bytes, as
//! [`mla_core::Element`] has it); a buffer of bit patterns (`CudaSlice<u16>` holding bf16 or fp16 bits) names its
//! type with `with_dtype`. [`Gpu`] opens a device for tests, benchmarks and examples: its primary context and that
//! context's legacy default stream, on which cudarc's own calls allocate, upload and download
//! (`gpu.stream().clone_htod(&v)`, `alloc_zeros`, `clone_dtoh`); [`Gpu::time_ms`] times work with events.
//!
//! ```no_run
//! use mla_hopper::device::{DeviceTensor, DeviceTensorMut, Gpu, driver_error};
//! use mla_core::scheduler::METADATA_WORDS;
//! use mla_core::{MetadataArgs, MlaBackend, Stream};
//!
//! # fn main() -> mla_core::Result<()> {
//! let backend = mla_hopper::HopperBackend::new(0)?;
//! let gpu = Gpu::open(0)?;
//! let upload = |v: &[i32]| gpu.stream().clone_htod(v).map_err(driver_error("cuMemcpyHtoDAsync"));
//! let seqlens = upload(&[300, 20])?;
//! let parts = backend.num_sm_parts(1, 1);
//! let (mut metadata, mut num_splits) = (upload(&vec![0; parts * METADATA_WORDS])?, upload(&[0; 3])?);
//!
//! // Views are bound to locals: a descriptor borrows its view, which must outlive the call.
//! let seqlens_view = DeviceTensor::new(gpu.stream(), &seqlens, &[2])?;
//! let metadata_view = DeviceTensorMut::new(gpu.stream(), &mut metadata, &[parts, METADATA_WORDS])?;
//! let num_splits_view = DeviceTensorMut::new(gpu.stream(), &mut num_splits, &[3])?;
//! let args = MetadataArgs {
//!     cache_seqlens: seqlens_view.desc(),
//!     q_seq_per_hk: 1,
//!     h_kv: 1,
//!     tile_scheduler_metadata: metadata_view.desc(),
//!     num_splits: num_splits_view.desc(),
//! };
//! backend.get_mla_metadata(&args, Stream::DEFAULT)?;
//! # Ok(())
//! # }
//! ```
//!
//! (`examples/cuda_decode.rs` of the `flashmla` crate is a whole decode.)
//!
//! ## Why this is sound: stream order
//!
//! A backend call only enqueues work; the kernels read and write the buffers later. The borrow makes sure that the
//! memory is allocated, and the right size, when the call is made; that it is still allocated when the kernels run
//! follows from the order of the legacy default stream, on which every view is taken. What this relies on, in
//! cudarc 0.19.10 (the version in Cargo.lock):
//!
//! - **Views are taken for the legacy default stream, the one stream safe code can hand a backend.** A safe caller
//!   can only pass [`Stream::DEFAULT`](mla_core::Stream::DEFAULT) (any other handle needs the `unsafe`
//!   [`Stream::from_raw`](mla_core::Stream::from_raw)), and that is the legacy default stream of the context the
//!   backend runs in: the device's primary context, which [`crate::HopperBackend`] opens with
//!   `CudaContext::new`. So the constructors take the [`CudaStream`] the work will be ordered on and accept only
//!   the legacy default stream (`CudaContext::default_stream`, the null handle) of a primary context, reached
//!   through the same `Arc<CudaContext>` handle as the buffer's stream (cudarc keeps event tracking and
//!   multi-stream mode per handle, and the bullets below need the buffer and the view to see the same state), and
//!   describe the memory as `Device::Cuda(ordinal)`, which validation matches against the backend's device.
//!   [`Gpu::stream`] is that stream for the buffers allocated on it.
//! - **The pointer comes from `device_ptr(&stream)` / `device_ptr_mut(&stream)`, and its guard lives as long as the
//!   view.** When cudarc manages synchronisation (event tracking on and a second stream created in the context),
//!   `device_ptr` makes `stream` wait for the buffer's last recorded write, `device_ptr_mut` for its last read and
//!   write, so the kernels see the uploads that precede them; the returned `SyncOnDrop` guard records the buffer's
//!   read (or write) event on `stream` when dropped. A view keeps the guard, and its descriptor borrows the view
//!   (`desc(&self) -> TensorDesc<'_>`), so the guard is dropped after the last call that used the descriptor was
//!   enqueued: the event then covers the kernels, and later cudarc work on another stream (a download, a copy)
//!   waits for them.
//! - **cudarc frees a buffer stream-ordered, after the work recorded on it.** `CudaSlice::drop` makes the buffer's
//!   own stream wait for its read and write events (when it manages synchronisation), then frees it with
//!   `cuMemFreeAsync` on that stream, or, on a device without memory pools, synchronises that stream and calls
//!   `cuMemFree`. A buffer allocated on the legacy default stream is therefore freed after everything enqueued there
//!   before the drop, the backend's kernels included; one allocated on a per-thread default stream likewise (those
//!   synchronise with the legacy stream); one allocated on a stream of `new_stream` or `fork` (non-blocking) keeps
//!   that stream, and with it the handle's multi-stream mode, alive, so the events above order it, unless event
//!   tracking was turned off with the `unsafe` `CudaContext::disable_event_tracking`, whose caller then promises to
//!   order its streams by hand. Streams of other libraries enter cudarc only through the `unsafe`
//!   `CudaContext::wrap_borrowed_stream`, with the same promise.
//!
//! A caller that enqueues on another stream ([`Stream::from_raw`](mla_core::Stream::from_raw), e.g. to capture a CUDA
//! graph) steps outside this argument: the views still keep the buffers borrowed and in bounds during the call, but
//! ordering the other stream with the legacy one (and with the buffers' frees) is then part of that `unsafe`
//! promise.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

#[doc(no_inline)]
pub use cudarc;
#[doc(no_inline)]
pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DriverError};
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop, sys};
use mla_core::tensor::{MAX_NDIM, contiguous_strides};
use mla_core::{Device, Error, Result, ScalarType, TensorDesc, Workspace};

use crate::error::{HopperError, no_panic, open_primary_context};

mod sealed {
    /// Only this module's element types can be viewed.
    pub trait Sealed {}
}

/// Element types of device buffers a view can describe: plain numbers every bit pattern of which is a value, so a
/// backend may store any result in them (sealed). The scalar type is the caller's (`with_dtype`), of the same size.
pub trait DeviceBits: DeviceRepr + sealed::Sealed {}

/// Element types whose scalar type follows from the type (as [`mla_core::Element`]): `bf16`, `f16`, `f32`, `i32`, and
/// `u8` as e4m3 bytes (the element type of an FP8 KV cache).
pub trait DeviceElement: DeviceBits {
    /// The scalar type a view of this element type describes.
    const SCALAR: ScalarType;
}

macro_rules! device_elements {
    ($($t:ty => $scalar:expr),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl DeviceBits for $t {}
        impl DeviceElement for $t {
            const SCALAR: ScalarType = $scalar;
        }
    )*};
}

device_elements! {
    half::bf16 => ScalarType::Bf16,
    half::f16 => ScalarType::F16,
    f32 => ScalarType::F32,
    i32 => ScalarType::I32,
    u8 => ScalarType::E4M3,
}

impl sealed::Sealed for u16 {}
/// bf16 or fp16 bit patterns (what `half`'s bit-slice conversions and `.npy` files give); name the type with
/// `with_dtype`.
impl DeviceBits for u16 {}

/// Turns a cudarc driver error into the API's error ([`Error::Backend`]), naming the call:
/// `stream.clone_htod(&v).map_err(driver_error("cuMemcpyHtoDAsync"))?`.
pub fn driver_error(call: &'static str) -> impl Fn(DriverError) -> Error {
    move |source| HopperError::Driver { call, source }.into()
}

/// Checks that `stream` is the legacy default stream of the primary context that owns the buffer, reached through
/// the same cudarc context handle (see the module documentation: the only stream safe code can hand a backend, and
/// the handle whose synchronisation state the buffer's events follow) and returns the buffer's device.
fn check_stream(stream: &CudaStream, owner: &Arc<CudaStream>) -> Result<Device> {
    let ctx = owner.context();
    if !ctx.is_primary() {
        return Err(Error::invalid(
            "data",
            "memory of a device's primary context (CudaContext::new), the context the backends run in",
            format!("memory of a non-primary context of device {}", ctx.ordinal()),
        ));
    }
    if !Arc::ptr_eq(stream.context(), ctx) {
        return Err(Error::invalid(
            "stream",
            format!("a stream of the CudaContext handle that allocated the buffer (device {})", ctx.ordinal()),
            format!("a stream of another handle (device {})", stream.context().ordinal()),
        ));
    }
    if !stream.cu_stream().is_null() {
        return Err(Error::invalid(
            "stream",
            "the legacy default stream (CudaContext::default_stream, the stream Stream::DEFAULT names)",
            format!("stream {:p}", stream.cu_stream()),
        ));
    }
    let ordinal =
        i32::try_from(ctx.ordinal()).map_err(|_| Error::invalid("data", "a device ordinal < 2^31", ctx.ordinal()))?;
    Ok(Device::Cuda(ordinal))
}

/// Checks that the caller's scalar type has the buffer's element size.
fn check_dtype<T>(dtype: ScalarType) -> Result<()> {
    let size = std::mem::size_of::<T>();
    if dtype.size_bytes() != size {
        return Err(Error::invalid(
            "dtype",
            format!("a {size}-byte scalar type (the buffer's element size)"),
            format!("{dtype:?} ({} bytes)", dtype.size_bytes()),
        ));
    }
    Ok(())
}

/// The shape, strides (`None`: row-major) and scalar type of a view.
struct Layout<'s> {
    dtype: ScalarType,
    shape: &'s [usize],
    strides: Option<&'s [usize]>,
}

/// The one place device addresses become descriptors: `len` elements of the view's dtype at `addr`, checked to
/// address only those. The caller ties `'a` to its borrow of the buffer.
fn describe<'a>(addr: sys::CUdeviceptr, len: usize, layout: &Layout, device: Device) -> Result<TensorDesc<'a>> {
    let shape: Vec<i64> = layout.shape.iter().map(|&d| d as i64).collect();
    let strides: Vec<i64> = match layout.strides {
        Some(s) => s.iter().map(|&d| d as i64).collect(),
        None => contiguous_strides(&shape)[..shape.len().min(MAX_NDIM)].to_vec(),
    };
    // SAFETY: until the check below passes, the descriptor is only inspected (its extent), never passed on. After
    // it, every element the shape and strides address lies within the `len` elements at `addr`: one live allocation
    // of `device`'s primary context (checked by `check_stream`), of elements of the dtype's size (`check_dtype`),
    // that the caller's view borrows for `'a` (shared for a read-only view, exclusively for a writable one, so
    // nothing else writes it meanwhile). That it stays allocated until the kernels enqueued with the descriptor have
    // run is the stream-order argument of the module documentation.
    let desc = unsafe { TensorDesc::from_raw(addr as usize as *mut c_void, layout.dtype, &shape, &strides, device) }?;
    let extent = desc
        .extent_elements()
        .ok_or_else(|| Error::invalid("shape", "a shape and strides whose extent fits in i64", desc.shape_string()))?;
    if extent as u128 > len as u128 {
        return Err(Error::invalid(
            "data",
            format!(
                "a buffer of at least {extent} elements for shape {:?} and strides {:?}",
                layout.shape,
                desc.stride_slice()
            ),
            format!("{len} elements"),
        ));
    }
    Ok(desc)
}

/// A read-only tensor over a borrowed device buffer; every addressed element is inside the buffer, and its
/// descriptor cannot outlive the view (see the module documentation for what orders the kernels with the buffer).
///
/// A descriptor cannot outlive its buffer:
///
/// ```compile_fail
/// # use mla_hopper::device::{DeviceTensor, Gpu};
/// # fn f(gpu: &Gpu) -> mla_core::Result<()> {
/// let desc = {
///     let buf = gpu.stream().alloc_zeros::<f32>(4).unwrap();
///     let view = DeviceTensor::new(gpu.stream(), &buf, &[4])?;
///     view.desc()
/// }; // `buf` is freed here
/// # let _ = desc;
/// # Ok(())
/// # }
/// ```
///
/// nor its view, whose guard orders later work with the kernels that used the descriptor:
///
/// ```compile_fail
/// # use mla_hopper::device::{DeviceTensor, Gpu};
/// # fn f(gpu: &Gpu) -> mla_core::Result<()> {
/// let buf = gpu.stream().alloc_zeros::<f32>(4).unwrap();
/// let desc = DeviceTensor::new(gpu.stream(), &buf, &[4])?.desc(); // the view ends with the statement
/// # let _ = desc;
/// # Ok(())
/// # }
/// ```
///
/// and a buffer cannot be viewed while a writable view of it exists:
///
/// ```compile_fail
/// # use mla_hopper::device::{DeviceTensor, DeviceTensorMut, Gpu};
/// # fn f(gpu: &Gpu) -> mla_core::Result<()> {
/// let mut buf = gpu.stream().alloc_zeros::<f32>(4).unwrap();
/// let out = DeviceTensorMut::new(gpu.stream(), &mut buf, &[4])?;
/// let input = DeviceTensor::new(gpu.stream(), &buf, &[4])?;
/// # let _ = (out.desc(), input.desc());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DeviceTensor<'a> {
    desc: TensorDesc<'a>,
    /// Records the buffer's read event on the stream when the view ends (after the calls that used it).
    _order: SyncOnDrop<'a>,
}

impl<'a> DeviceTensor<'a> {
    /// Row-major view of `data` with this shape, for work on `stream` (the legacy default stream of the buffer's
    /// context, e.g. [`Gpu::stream`]).
    pub fn new<T: DeviceElement, S: DevicePtr<T>>(
        stream: &'a CudaStream,
        data: &'a S,
        shape: &[usize],
    ) -> Result<Self> {
        Self::view(stream, data, &Layout { dtype: T::SCALAR, shape, strides: None })
    }

    /// View with explicit element strides.
    pub fn with_strides<T: DeviceElement, S: DevicePtr<T>>(
        stream: &'a CudaStream,
        data: &'a S,
        shape: &[usize],
        strides: &[usize],
    ) -> Result<Self> {
        Self::view(stream, data, &Layout { dtype: T::SCALAR, shape, strides: Some(strides) })
    }

    /// View of a buffer of bit patterns as `dtype` (of the same size), e.g. a `CudaSlice<u16>` as bf16;
    /// `strides: None` is row-major.
    pub fn with_dtype<T: DeviceBits, S: DevicePtr<T>>(
        stream: &'a CudaStream,
        data: &'a S,
        dtype: ScalarType,
        shape: &[usize],
        strides: Option<&[usize]>,
    ) -> Result<Self> {
        Self::view(stream, data, &Layout { dtype, shape, strides })
    }

    fn view<T: DeviceBits, S: DevicePtr<T>>(stream: &'a CudaStream, data: &'a S, layout: &Layout) -> Result<Self> {
        let device = check_stream(stream, data.stream())?;
        check_dtype::<T>(layout.dtype)?;
        let (addr, order) = data.device_ptr(stream);
        let desc = describe(addr, data.len(), layout, device)?.read_only();
        Ok(DeviceTensor { desc, _order: order })
    }

    /// The descriptor to pass to a backend (read-only: refused as an output). It borrows the view, so the view
    /// (and its ordering guard) outlives every call that uses it.
    pub fn desc(&self) -> TensorDesc<'_> {
        self.desc
    }
}

/// A writable tensor over an exclusively borrowed device buffer; every addressed element is inside the buffer, and
/// its descriptor cannot outlive the view.
#[derive(Debug)]
pub struct DeviceTensorMut<'a> {
    desc: TensorDesc<'a>,
    /// Records the buffer's write event on the stream when the view ends (after the calls that used it).
    _order: SyncOnDrop<'a>,
}

impl<'a> DeviceTensorMut<'a> {
    /// Row-major view of `data` with this shape, for work on `stream` (the legacy default stream of the buffer's
    /// context, e.g. [`Gpu::stream`]).
    pub fn new<T: DeviceElement, S: DevicePtrMut<T>>(
        stream: &'a CudaStream,
        data: &'a mut S,
        shape: &[usize],
    ) -> Result<Self> {
        Self::view(stream, data, &Layout { dtype: T::SCALAR, shape, strides: None })
    }

    /// View with explicit element strides.
    pub fn with_strides<T: DeviceElement, S: DevicePtrMut<T>>(
        stream: &'a CudaStream,
        data: &'a mut S,
        shape: &[usize],
        strides: &[usize],
    ) -> Result<Self> {
        Self::view(stream, data, &Layout { dtype: T::SCALAR, shape, strides: Some(strides) })
    }

    /// View of a buffer of bit patterns as `dtype` (of the same size), e.g. a `CudaSlice<u16>` as bf16;
    /// `strides: None` is row-major.
    pub fn with_dtype<T: DeviceBits, S: DevicePtrMut<T>>(
        stream: &'a CudaStream,
        data: &'a mut S,
        dtype: ScalarType,
        shape: &[usize],
        strides: Option<&[usize]>,
    ) -> Result<Self> {
        Self::view(stream, data, &Layout { dtype, shape, strides })
    }

    fn view<T: DeviceBits, S: DevicePtrMut<T>>(
        stream: &'a CudaStream,
        data: &'a mut S,
        layout: &Layout,
    ) -> Result<Self> {
        let device = check_stream(stream, data.stream())?;
        check_dtype::<T>(layout.dtype)?;
        let len = data.len();
        let (addr, order) = data.device_ptr_mut(stream);
        let desc = describe(addr, len, layout, device)?;
        Ok(DeviceTensorMut { desc, _order: order })
    }

    /// The descriptor to pass to a backend (writable). Validation refuses an output that overlaps any other tensor
    /// of the call, so copies of it cannot alias.
    pub fn desc(&self) -> TensorDesc<'_> {
        self.desc
    }
}

/// A workspace over an exclusively borrowed device byte buffer (all of it), for work on the legacy default stream.
#[derive(Debug)]
pub struct DeviceWorkspace<'a> {
    addr: sys::CUdeviceptr,
    bytes: usize,
    device: Device,
    /// Records the buffer's write event on the stream when the view ends (after the calls that used it).
    _order: SyncOnDrop<'a>,
    _memory: PhantomData<&'a mut [u8]>,
}

impl<'a> DeviceWorkspace<'a> {
    /// The whole of `data` as a workspace, for work on `stream` (the legacy default stream of its context).
    pub fn new<S: DevicePtrMut<u8>>(stream: &'a CudaStream, data: &'a mut S) -> Result<Self> {
        let device = check_stream(stream, data.stream())?;
        let bytes = data.len();
        let (addr, order) = data.device_ptr_mut(stream);
        Ok(DeviceWorkspace { addr, bytes, device, _order: order, _memory: PhantomData })
    }

    /// The workspace to pass to a backend; it borrows the view.
    pub fn workspace(&self) -> Workspace<'_> {
        // SAFETY: `bytes` bytes at `addr` are one live allocation of `device`'s primary context (checked by
        // `check_stream`), borrowed exclusively by this view, so nothing else reads or writes them while a call runs;
        // the returned workspace cannot outlive the view, and the stream-order argument of the module documentation
        // keeps the memory allocated until the enqueued kernels have run. A zero-byte buffer may have a null
        // address, which the contract allows for 0 bytes.
        unsafe { Workspace::from_raw(self.addr as usize as *mut c_void, self.bytes, self.device) }
    }
}

/// A CUDA device opened for buffers: its primary context (the one the backends run in) and that context's legacy
/// default stream. cudarc's own calls do the rest: `gpu.stream().clone_htod(&v)` uploads,
/// `gpu.stream().alloc_zeros::<T>(n)` allocates, `gpu.stream().clone_dtoh(&buf)` downloads (and waits).
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Gpu {
    /// Opens CUDA device `ordinal`. Errors with [`Error::Unavailable`] (no driver, no such device) instead of
    /// panicking, as [`crate::HopperBackend::new`]; any GPU will do (no compute-capability check).
    pub fn open(ordinal: i32) -> Result<Gpu> {
        no_panic(|| {
            let ctx = open_primary_context(ordinal)?;
            let stream = ctx.default_stream();
            Ok(Gpu { ctx, stream })
        })
    }

    /// The device's primary context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The context's legacy default stream: the one views are taken for and [`mla_core::Stream::DEFAULT`] names.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `Device::Cuda(ordinal)`.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ctx.ordinal() as i32)
    }

    /// Runs `f` (which enqueues work on the legacy default stream) between two timing events and returns its result
    /// and the GPU time between the events in milliseconds (waits for the second event).
    pub fn time_ms<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, f32)> {
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timed).map_err(driver_error("cuEventRecord"))?;
        let r = f()?;
        let end = self.stream.record_event(timed).map_err(driver_error("cuEventRecord"))?;
        let ms = start.elapsed_ms(&end).map_err(driver_error("cuEventElapsedTime"))?;
        Ok((r, ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_types_describe_their_scalar_type() {
        assert_eq!(<half::bf16 as DeviceElement>::SCALAR, ScalarType::Bf16);
        assert_eq!(<u8 as DeviceElement>::SCALAR, <u8 as mla_core::Element>::SCALAR);
        assert!(check_dtype::<u16>(ScalarType::F16).is_ok());
        let e = check_dtype::<u16>(ScalarType::F32).unwrap_err().to_string();
        assert!(e.contains("`dtype`") && e.contains("2-byte"), "{e}");
    }

    #[test]
    fn describe_checks_the_extent_against_the_buffer() {
        let layout = Layout { dtype: ScalarType::F32, shape: &[2, 3], strides: Some(&[4, 1]) };
        let d = describe(0x1000, 7, &layout, Device::Cuda(0)).unwrap();
        assert_eq!((d.dims(), d.stride_slice(), d.device()), (&[2i64, 3][..], &[4i64, 1][..], Device::Cuda(0)));
        let e = describe(0x1000, 6, &layout, Device::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("`data`") && e.contains("at least 7 elements") && e.contains("got 6 elements"), "{e}");
        let row_major = describe(0x1000, 6, &Layout { strides: None, ..layout }, Device::Cuda(0)).unwrap();
        assert_eq!(row_major.stride_slice(), &[3, 1]);
        let huge = Layout { dtype: ScalarType::F32, shape: &[usize::MAX, 2], strides: None };
        assert!(describe(0x1000, 6, &huge, Device::Cuda(0)).is_err());
    }

    #[test]
    fn opening_a_missing_device_is_an_error_not_a_panic() {
        let e = Gpu::open(i32::MAX).unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    }
}
