//! Outputs, metadata and workspaces allocated through the caller's framework, and the stream to launch on.
//!
//! CUDA tensors get `torch.empty` on the reference tensor's device: PyTorch's caching allocator, so both calls can
//! be captured in a `torch.cuda.graph` (allocations inside a capture come from the graph's pool). CPU torch
//! tensors get CPU torch tensors; NumPy arrays and other CPU DLPack producers get NumPy arrays.

use flashmla::splitkv::WORKSPACE_ALIGN;
use flashmla::{Device, ScalarType, Stream};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

use std::ffi::c_void;

use flashmla::TensorDesc;

use crate::args::{Arg, Framework, Repr, Torch, numpy_address};
use crate::errors::invalid;

/// A tensor allocated here: the object handed back to the caller and its descriptor.
pub struct Out<'py> {
    /// The framework's tensor.
    pub obj: Bound<'py, PyAny>,
    /// Its descriptor (row-major).
    pub desc: TensorDesc<'py>,
}

/// Allocates like a reference argument (its framework and device).
pub struct Allocator<'py> {
    py: Python<'py>,
    func: &'static str,
    kind: Kind<'py>,
}

enum Kind<'py> {
    /// `native`: the reference's element type when it is a real torch dtype (outputs of that type need no `dtype=`).
    Torch {
        torch: &'static Torch,
        reference: Bound<'py, PyAny>,
        device: Device,
        native: Option<ScalarType>,
    },
    Numpy {
        np: Bound<'py, PyModule>,
    },
}

static ML_DTYPES_BF16: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static NUMPY: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The numpy module, imported once (a DLPack CPU producer may come without NumPy loaded yet).
fn numpy(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    Ok(NUMPY.get_or_try_init(py, || -> PyResult<Py<PyModule>> { Ok(py.import("numpy")?.unbind()) })?.bind(py).clone())
}

impl<'py> Allocator<'py> {
    /// An allocator for outputs of `reference`'s framework and device.
    pub fn new(py: Python<'py>, func: &'static str, reference: &Arg<'py>) -> PyResult<Self> {
        let kind = match reference.framework {
            Framework::Torch => {
                let torch = Torch::get(py)?.expect("a torch.Tensor was described, so torch is imported");
                Kind::Torch {
                    torch,
                    reference: reference.obj.clone(),
                    device: reference.desc.device(),
                    native: (reference.repr == Repr::Native).then(|| reference.desc.dtype()),
                }
            }
            _ if matches!(reference.desc.device(), Device::Cuda(_)) => {
                return Err(invalid(
                    py,
                    func,
                    "q",
                    "a torch.Tensor for CUDA inputs (outputs are allocated with the caller's framework; wrap other \
                     CUDA arrays with torch.from_dlpack, which does not copy)",
                    reference.obj.get_type().name()?,
                ));
            }
            _ => Kind::Numpy { np: numpy(py)? },
        };
        Ok(Allocator { py, func, kind })
    }

    /// A new uninitialised row-major tensor, described for the library. `repr` picks raw-bit outputs for raw-bit
    /// inputs. Only the address is read back: the shape, strides and dtype are the ones asked for.
    pub fn empty(&self, name: &str, shape: &[i64], scalar: ScalarType, repr: Repr) -> PyResult<Out<'py>> {
        let py = self.py;
        let shape_t = PyTuple::new(py, shape)?;
        let (obj, data, device): (Bound<'py, PyAny>, usize, Device) = match &self.kind {
            Kind::Torch { torch, reference, device, native } => {
                // Tensor.new_empty keeps the reference's device without parsing a `device=` argument (2.6-2.8 µs
                // against torch.empty's 3.3-3.5 on the H200's host). Its dtype is the reference's unless told
                // otherwise, through a prebuilt `dtype=` dict.
                let new_empty = intern!(py, "new_empty");
                let obj = if *native == Some(scalar) {
                    reference.call_method1(new_empty, (shape_t,))?
                } else {
                    reference.call_method(new_empty, (shape_t,), Some(torch.dtype_kwargs(py, scalar)))?
                };
                let data = obj.call_method0(intern!(py, "data_ptr"))?.extract()?;
                (obj, data, *device)
            }
            Kind::Numpy { np } => {
                let (dtype, type_name): (Bound<'py, PyAny>, &str) = match (scalar, repr) {
                    (ScalarType::Bf16, Repr::Native) => (
                        ML_DTYPES_BF16
                            .get_or_try_init(py, || -> PyResult<Py<PyAny>> {
                                Ok(py.import("ml_dtypes")?.getattr("bfloat16")?.unbind())
                            })?
                            .bind(py)
                            .clone(),
                        "bfloat16",
                    ),
                    (ScalarType::Bf16, Repr::Bits) => (np.getattr("uint16")?, "uint16"),
                    (ScalarType::E4M3, _) => (np.getattr("uint8")?, "uint8"),
                    // NumPy has float16 itself: raw-bit fp16 inputs still get float16 outputs.
                    (ScalarType::F16, _) => (np.getattr("float16")?, "float16"),
                    (ScalarType::F32, _) => (np.getattr("float32")?, "float32"),
                    (ScalarType::I32, _) => (np.getattr("int32")?, "int32"),
                };
                let obj = np.getattr(intern!(py, "empty"))?.call1((shape_t, dtype))?;
                let data = numpy_address(py, self.func, name, &obj, scalar, type_name)?;
                (obj, data, Device::Host)
            }
        };
        // SAFETY: `obj` was just allocated with exactly this shape and element type, row-major, on `device`; it is
        // returned with the descriptor (which cannot outlive 'py) and nothing else references it yet.
        let desc = unsafe { TensorDesc::from_raw_contiguous(data as *mut c_void, scalar, shape, device) }
            .map_err(|e| crate::errors::to_py(py, self.func, e))?;
        Ok(Out { obj, desc })
    }

    /// A byte buffer of at least `bytes` bytes: (owner, address aligned to [`WORKSPACE_ALIGN`]).
    pub fn workspace(&self, bytes: usize) -> PyResult<(Option<Bound<'py, PyAny>>, usize)> {
        if bytes == 0 {
            return Ok((None, 0));
        }
        let py = self.py;
        let len = bytes + WORKSPACE_ALIGN;
        let (buf, base): (Bound<'py, PyAny>, usize) = match &self.kind {
            Kind::Torch { torch, reference, .. } => {
                let buf = reference.call_method(intern!(py, "new_empty"), ((len,),), Some(torch.u8_kwargs.bind(py)))?;
                let base = buf.call_method0(intern!(py, "data_ptr"))?.extract()?;
                (buf, base)
            }
            Kind::Numpy { np } => {
                let buf = np.getattr(intern!(py, "empty"))?.call1(((len,), np.getattr("uint8")?))?;
                let iface = buf.getattr(intern!(py, "__array_interface__"))?;
                let base = iface.get_item("data")?.get_item(0)?.extract()?;
                (buf, base)
            }
        };
        Ok((Some(buf), base.next_multiple_of(WORKSPACE_ALIGN)))
    }

    /// The stream to launch on: PyTorch's current stream of the reference device (the default on the CPU).
    pub fn stream(&self) -> PyResult<Stream> {
        let py = self.py;
        let Kind::Torch { torch, device: Device::Cuda(ordinal), .. } = &self.kind else { return Ok(Stream::DEFAULT) };
        let handle: usize = match &torch.raw_stream {
            Some(f) => f.bind(py).call1((*ordinal,))?.extract()?,
            None => py
                .import("torch.cuda")?
                .call_method1("current_stream", (*ordinal,))?
                .getattr("cuda_stream")?
                .extract()?,
        };
        // SAFETY: PyTorch's current stream of this device: a live CUDA stream of the device's primary context (the
        // context the Hopper backend binds), or 0, the legacy default stream.
        Ok(unsafe { Stream::from_raw(handle as *mut c_void) })
    }
}
