//! From Python objects to [`TensorDesc`]s: `torch.Tensor`, `numpy.ndarray` and other DLPack producers.
//!
//! Which element type an argument has is decided here, from the framework's own dtype:
//!
//! | argument's dtype | element type |
//! |---|---|
//! | `torch.bfloat16`, `ml_dtypes.bfloat16` | bf16 |
//! | `torch.float16`, `numpy.float16` | fp16 |
//! | `torch.float8_e4m3fn`, `ml_dtypes.float8_e4m3fn` | e4m3 |
//! | `float32`, `int32` | f32, i32 |
//! | `uint16`/`int16` + `dtype="bf16"` or `"fp16"`, `uint8`/`int8` + `dtype="e4m3"` | raw bits of that type |
//! | another `__dlpack__` producer | from its `DLDataType` |
//!
//! Torch tensors are read through a handful of attribute calls (`dtype`, `shape`, `stride()`, `data_ptr()`,
//! `get_device()`), each a C call inside PyTorch: no Python-level code runs and nothing is allocated, which is
//! what keeps a decode call within a few microseconds of the kernel launch. Only the metadata is read here; every
//! check of shapes, strides, dtypes and devices is the library's ([`flashmla::validate_decode`]), so its messages
//! reach the caller unchanged.

use std::ffi::{CStr, c_void};

use flashmla::tensor::MAX_NDIM;
use flashmla::{Device, ScalarType, TensorDesc};
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

use crate::errors::invalid;

/// Which framework produced an argument (and so allocates the outputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framework {
    /// `torch.Tensor`.
    Torch,
    /// `numpy.ndarray`.
    Numpy,
    /// Another `__dlpack__` producer (CPU only: outputs are NumPy arrays).
    Dlpack,
}

/// How an element type is represented by the caller: a real dtype, or raw bits in an integer array with a
/// `dtype=` hint (NumPy without ml_dtypes). Outputs follow the representation of `q`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repr {
    /// A dtype of the framework (`torch.bfloat16`, `numpy.float16`, `ml_dtypes.bfloat16`, …).
    Native,
    /// Raw bits (`uint16` holding bfloat16 bits, …).
    Bits,
}

/// One tensor argument, described for the library. Holds what must stay alive during the call.
pub struct Arg<'py> {
    /// The descriptor handed to the backend (valid while `obj` is alive, which `'py` and this struct ensure).
    pub desc: TensorDesc<'py>,
    /// The producing framework.
    pub framework: Framework,
    /// See [`Repr`].
    pub repr: Repr,
    /// The caller's object.
    pub obj: Bound<'py, PyAny>,
    /// A DLPack capsule to keep until the call ends (its destructor releases the producer's export).
    _capsule: Option<Bound<'py, PyAny>>,
}

impl Arg<'_> {
    /// Extents (the first `ndim` of them; more than four dims are rejected while describing).
    pub fn dims(&self) -> &[i64] {
        self.desc.dims()
    }
}

/// PyTorch's objects the hot path compares against, looked up once (only when torch is imported already).
pub struct Torch {
    /// `torch.Tensor`.
    pub tensor: Py<PyAny>,
    bf16: Py<PyAny>,
    f16: Py<PyAny>,
    f32: Py<PyAny>,
    i32: Py<PyAny>,
    /// `torch.float8_e4m3fn` (absent before PyTorch 2.1).
    e4m3: Option<Py<PyAny>>,
    bits16: [Option<Py<PyAny>>; 2],
    bits8: [Py<PyAny>; 2],
    /// `{"dtype": torch.uint8}`, for workspaces' `new_empty`.
    pub u8_kwargs: Py<PyDict>,
    /// `{"dtype": d}` for each output element type, in [`Torch::dtype`]'s order (never mutated: callees only read
    /// keyword dicts).
    dtype_kwargs: [Py<PyDict>; 5],
    /// `torch._C._cuda_getCurrentRawStream(device_index) -> int` (what torch.compile's generated code calls), or
    /// `None` on builds without it (then the public `torch.cuda.current_stream`).
    pub raw_stream: Option<Py<PyAny>>,
}

static TORCH: PyOnceLock<Torch> = PyOnceLock::new();
static SYS_MODULES: PyOnceLock<Py<PyDict>> = PyOnceLock::new();

/// An already imported module, or None: a lookup in `sys.modules`, never an import. (`py.import` of an imported
/// module still runs the import machinery, Python code included: microseconds that every call would pay.)
pub fn imported<'py>(py: Python<'py>, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
    let modules = SYS_MODULES.get_or_try_init(py, || -> PyResult<Py<PyDict>> {
        Ok(py.import("sys")?.getattr("modules")?.cast_into::<PyDict>()?.unbind())
    })?;
    modules.bind(py).get_item(name)
}

impl Torch {
    /// The cached objects, if torch is imported (never imports it: NumPy users pay nothing for it).
    pub fn get(py: Python<'_>) -> PyResult<Option<&'static Torch>> {
        if let Some(t) = TORCH.get(py) {
            return Ok(Some(t));
        }
        let Some(torch) = imported(py, "torch")? else { return Ok(None) };
        let attr = |name: &str| -> PyResult<Py<PyAny>> { Ok(torch.getattr(name)?.unbind()) };
        let opt = |name: &str| torch.getattr(name).ok().map(Bound::unbind);
        let raw_stream =
            torch.getattr("_C").and_then(|c| c.getattr("_cuda_getCurrentRawStream")).ok().map(Bound::unbind);
        let kwargs = |dtype: &Py<PyAny>| -> PyResult<Py<PyDict>> {
            let d = PyDict::new(py);
            d.set_item("dtype", dtype.bind(py))?;
            Ok(d.unbind())
        };
        let (bf16, f16, f32, i32) = (attr("bfloat16")?, attr("float16")?, attr("float32")?, attr("int32")?);
        let (e4m3, u8) = (opt("float8_e4m3fn"), attr("uint8")?);
        let dtype_kwargs =
            [kwargs(&bf16)?, kwargs(&f16)?, kwargs(&f32)?, kwargs(&i32)?, kwargs(e4m3.as_ref().unwrap_or(&u8))?];
        let t = Torch {
            tensor: attr("Tensor")?,
            bf16,
            f16,
            f32,
            i32,
            e4m3,
            bits16: [opt("int16"), opt("uint16")],
            bits8: [u8.clone_ref(py), attr("int8")?],
            u8_kwargs: kwargs(&u8)?,
            dtype_kwargs,
            raw_stream,
        };
        Ok(Some(TORCH.get_or_init(py, || t)))
    }

    /// `{"dtype": d}` with the torch dtype of an element type (e4m3 without `torch.float8_e4m3fn`: uint8), for
    /// outputs' `new_empty`.
    pub fn dtype_kwargs<'a, 'py>(&'a self, py: Python<'py>, s: ScalarType) -> &'a Bound<'py, PyDict> {
        let i = match s {
            ScalarType::Bf16 => 0,
            ScalarType::F16 => 1,
            ScalarType::F32 => 2,
            ScalarType::I32 => 3,
            ScalarType::E4M3 => 4,
        };
        self.dtype_kwargs[i].bind(py)
    }

    fn scalar(&self, dtype: &Bound<'_, PyAny>, hint: Option<ScalarType>) -> Option<(ScalarType, Repr)> {
        let is = |d: &Py<PyAny>| dtype.is(d);
        let native = if is(&self.bf16) {
            Some(ScalarType::Bf16)
        } else if is(&self.f16) {
            Some(ScalarType::F16)
        } else if is(&self.f32) {
            Some(ScalarType::F32)
        } else if is(&self.i32) {
            Some(ScalarType::I32)
        } else if self.e4m3.as_ref().is_some_and(is) {
            Some(ScalarType::E4M3)
        } else {
            None
        };
        if let Some(s) = native {
            return Some((s, Repr::Native));
        }
        match hint? {
            h @ (ScalarType::Bf16 | ScalarType::F16) if self.bits16.iter().flatten().any(is) => Some((h, Repr::Bits)),
            ScalarType::E4M3 if self.bits8.iter().any(is) => Some((ScalarType::E4M3, Repr::Bits)),
            _ => None,
        }
    }
}

/// The element types the library may expect for an argument, for messages.
fn expected_dtypes(name: &str) -> &'static str {
    match name.split('.').next().unwrap_or(name) {
        "q" | "k_cache" => {
            "bfloat16, float16 or float8_e4m3fn (NumPy: ml_dtypes.bfloat16, numpy.float16, ml_dtypes.float8_e4m3fn, \
             or uint16/uint8 raw bits with dtype='bf16'/'fp16'/'e4m3')"
        }
        "descale_q" | "descale_k" => "float32",
        _ => "int32",
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    let t = obj.get_type();
    match (t.module(), t.qualname()) {
        (Ok(m), Ok(q)) => format!("{m}.{q}"),
        _ => "an unknown type".into(),
    }
}

/// `shape`/`strides` as a descriptor, or the library-style error for more than four dims.
// The argument's name and function travel with the tensor's parts for the error messages.
#[allow(clippy::too_many_arguments)]
fn make_desc<'py>(
    py: Python<'py>,
    func: &str,
    name: &str,
    data: usize,
    dtype: ScalarType,
    shape: &[i64],
    strides: &[i64],
    device: Device,
) -> PyResult<TensorDesc<'py>> {
    if shape.len() > MAX_NDIM {
        return Err(invalid(py, func, format!("{name}.ndim"), format!("at most {MAX_NDIM} dims"), shape.len()));
    }
    // SAFETY: the address, shape and strides are the framework's own description of a live tensor (a torch tensor's
    // view lies inside its storage, a NumPy array's inside its buffer, a DLPack export's inside what its producer
    // keeps alive); the caller's object is held in the Arg for the whole call ('py). Only outputs, which this module
    // allocates itself and nobody else references yet, are written.
    unsafe { TensorDesc::from_raw(data as *mut c_void, dtype, shape, strides, device) }
        .map_err(|e| crate::errors::to_py(py, func, e))
}

fn int_tuple(seq: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
    let t = seq.cast::<PyTuple>()?;
    t.iter().map(|v| v.extract::<i64>()).collect()
}

/// Describes a torch tensor.
fn torch_arg<'py>(
    py: Python<'py>,
    torch: &Torch,
    func: &str,
    name: &str,
    obj: &Bound<'py, PyAny>,
    hint: Option<ScalarType>,
) -> PyResult<Arg<'py>> {
    let dtype = obj.getattr(intern!(py, "dtype"))?;
    let Some((scalar, repr)) = torch.scalar(&dtype, hint) else {
        return Err(invalid(py, func, format!("{name}.dtype"), expected_dtypes(name), dtype.str()?));
    };
    // torch.Size is a tuple subclass: read it as one.
    let shape = int_tuple(&obj.getattr(intern!(py, "shape"))?)?;
    let strides = int_tuple(&obj.call_method0(intern!(py, "stride"))?)?;
    let data: usize = obj.call_method0(intern!(py, "data_ptr"))?.extract()?;
    // get_device(): the CUDA ordinal, -1 on the CPU (and on other devices, which is_cpu tells apart).
    let ordinal: i64 = obj.call_method0(intern!(py, "get_device"))?.extract()?;
    let device = if ordinal >= 0 {
        if !obj.getattr(intern!(py, "is_cuda"))?.is_truthy()? {
            let dev = obj.getattr(intern!(py, "device"))?.str()?;
            return Err(invalid(py, func, format!("{name}.device"), "a cpu or cuda tensor", dev));
        }
        Device::Cuda(i32::try_from(ordinal).unwrap_or(i32::MAX))
    } else if obj.getattr(intern!(py, "is_cpu"))?.is_truthy()? {
        Device::Host
    } else {
        let dev = obj.getattr(intern!(py, "device"))?.str()?;
        return Err(invalid(py, func, format!("{name}.device"), "a cpu or cuda tensor", dev));
    };
    let desc = make_desc(py, func, name, data, scalar, &shape, &strides, device)?;
    Ok(Arg { desc, framework: Framework::Torch, repr, obj: obj.clone(), _capsule: None })
}

/// (element type, representation) of a NumPy dtype, by name: ml_dtypes registers `bfloat16` and `float8_e4m3fn`,
/// and matching names keeps ml_dtypes optional.
fn numpy_scalar(dtype_name: &str, hint: Option<ScalarType>) -> Option<(ScalarType, Repr)> {
    let native = match dtype_name {
        "float16" => Some(ScalarType::F16),
        "float32" => Some(ScalarType::F32),
        "int32" => Some(ScalarType::I32),
        "bfloat16" => Some(ScalarType::Bf16),
        "float8_e4m3fn" => Some(ScalarType::E4M3),
        _ => None,
    };
    if let Some(s) = native {
        return Some((s, Repr::Native));
    }
    match (hint?, dtype_name) {
        (h @ (ScalarType::Bf16 | ScalarType::F16), "uint16" | "int16") => Some((h, Repr::Bits)),
        (ScalarType::E4M3, "uint8" | "int8") => Some((ScalarType::E4M3, Repr::Bits)),
        _ => None,
    }
}

/// NumPy's unsigned type of an element type's size, for the DLPack export of custom dtypes (ml_dtypes'
/// `bfloat16` and `float8_e4m3fn`, which NumPy refuses to export as they are).
fn numpy_bits_type(scalar: ScalarType) -> &'static str {
    match scalar.size_bytes() {
        1 => "uint8",
        2 => "uint16",
        _ => "uint32",
    }
}

/// The address of a NumPy array's first element: from a DLPack export (a C call), or for read-only arrays, which
/// NumPy does not export, from `__array_interface__` (a dict built per call).
pub fn numpy_address(
    py: Python<'_>,
    func: &str,
    name: &str,
    obj: &Bound<'_, PyAny>,
    scalar: ScalarType,
    type_name: &str,
) -> PyResult<usize> {
    let writeable = obj.getattr(intern!(py, "flags"))?.getattr(intern!(py, "writeable"))?.is_truthy()?;
    if !writeable {
        let iface = obj.getattr(intern!(py, "__array_interface__"))?;
        return iface.get_item("data")?.get_item(0)?.extract();
    }
    let custom = matches!(type_name, "bfloat16" | "float8_e4m3fn");
    let export = if custom { obj.call_method1(intern!(py, "view"), (numpy_bits_type(scalar),))? } else { obj.clone() };
    let capsule = export.call_method0(intern!(py, "__dlpack__"))?;
    // The capsule can go right away: the address stays valid while `obj` (the caller's array, which the view and the
    // export only reference) is alive, and the caller holds `obj` for the whole call.
    Ok(read_capsule(py, func, name, &capsule)?.data)
}

/// Describes a NumPy array. The dtype is recognised by its scalar type's `__name__` (a C-level getter; `dtype.name`
/// runs Python code inside NumPy). The address comes from a DLPack export (a C call), or for read-only arrays, which
/// NumPy does not export, from `__array_interface__`.
fn numpy_arg<'py>(
    py: Python<'py>,
    func: &str,
    name: &str,
    obj: &Bound<'py, PyAny>,
    hint: Option<ScalarType>,
) -> PyResult<Arg<'py>> {
    let dtype = obj.getattr(intern!(py, "dtype"))?;
    let dname: String = dtype.getattr(intern!(py, "type"))?.getattr(intern!(py, "__name__"))?.extract()?;
    let native_order = dtype.getattr(intern!(py, "isnative"))?.is_truthy()?;
    let Some((scalar, repr)) = numpy_scalar(&dname, hint).filter(|_| native_order) else {
        let shown = if native_order { dname } else { format!("{dname} (byte-swapped)") };
        return Err(invalid(py, func, format!("{name}.dtype"), expected_dtypes(name), shown));
    };
    let shape = int_tuple(&obj.getattr(intern!(py, "shape"))?)?;
    let item = scalar.size_bytes() as i64;
    let byte_strides = int_tuple(&obj.getattr(intern!(py, "strides"))?)?;
    if let Some((i, s)) = byte_strides.iter().enumerate().find(|(_, s)| **s % item != 0) {
        return Err(invalid(
            py,
            func,
            format!("{name}.strides[{i}]"),
            format!("a multiple of the element size ({item} bytes)"),
            format!("{s} bytes"),
        ));
    }
    let strides: Vec<i64> =
        if shape.len() > MAX_NDIM { vec![0; shape.len()] } else { byte_strides.iter().map(|s| s / item).collect() };
    let data = numpy_address(py, func, name, obj, scalar, &dname)?;
    let desc = make_desc(py, func, name, data, scalar, &shape, &strides, Device::Host)?;
    Ok(Arg { desc, framework: Framework::Numpy, repr, obj: obj.clone(), _capsule: None })
}

/// DLPack's `DLDevice`.
#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

/// DLPack's `DLDataType`.
#[repr(C)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

/// DLPack's `DLTensor` (the unversioned protocol's layout, stable since DLPack 0.2).
#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

/// `kDLCPU` / `kDLCUDA`.
const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;
/// `DLDataTypeCode`s.
const KDL_INT: u8 = 0;
const KDL_FLOAT: u8 = 2;
const KDL_BFLOAT: u8 = 4;
const KDL_FLOAT8_E4M3FN: u8 = 10;
/// The capsule name of an unconsumed DLPack export.
const DLTENSOR: &CStr = c"dltensor";

fn dlpack_scalar(d: &DlDataType) -> Option<ScalarType> {
    if d.lanes != 1 {
        return None;
    }
    match (d.code, d.bits) {
        (KDL_BFLOAT, 16) => Some(ScalarType::Bf16),
        (KDL_FLOAT, 16) => Some(ScalarType::F16),
        (KDL_FLOAT8_E4M3FN, 8) => Some(ScalarType::E4M3),
        (KDL_FLOAT, 32) => Some(ScalarType::F32),
        (KDL_INT, 32) => Some(ScalarType::I32),
        _ => None,
    }
}

/// What a DLPack export describes, copied out of the capsule.
struct Exported {
    data: usize,
    dtype: (u8, u8, u16),
    device: (i32, i32),
    shape: Vec<i64>,
    /// `None`: compact row-major.
    strides: Option<Vec<i64>>,
}

/// Reads an unconsumed "dltensor" capsule (the capsule is not consumed: its destructor still releases the export).
fn read_capsule(py: Python<'_>, func: &str, name: &str, capsule: &Bound<'_, PyAny>) -> PyResult<Exported> {
    // SAFETY: the pointer is the capsule object (alive: `capsule` is borrowed); GetPointer checks the name and
    // returns NULL with an exception set for anything but an unconsumed "dltensor" capsule.
    let managed = unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), DLTENSOR.as_ptr()) };
    if managed.is_null() {
        let e = PyErr::take(py).map(|e| e.value(py).to_string()).unwrap_or_default();
        return Err(invalid(py, func, name, "an unconsumed \"dltensor\" capsule from __dlpack__()", e));
    }
    // SAFETY: a "dltensor" capsule holds a DLManagedTensor, whose first member is the DLTensor; the producer keeps
    // it (and the shape/strides arrays it points to) alive until the capsule is destroyed, after this function.
    let t = unsafe { &*(managed as *const DlTensor) };
    let ndim = t.ndim.max(0) as usize;
    // SAFETY: DLPack guarantees `shape` has `ndim` entries and `strides` is NULL (compact) or has `ndim` entries.
    let shape = if ndim == 0 { Vec::new() } else { unsafe { std::slice::from_raw_parts(t.shape, ndim) }.to_vec() };
    let strides = (!t.strides.is_null() && ndim > 0)
        // SAFETY: as above.
        .then(|| unsafe { std::slice::from_raw_parts(t.strides, ndim) }.to_vec());
    Ok(Exported {
        data: (t.data as usize).wrapping_add(t.byte_offset as usize),
        dtype: (t.dtype.code, t.dtype.bits, t.dtype.lanes),
        device: (t.device.device_type, t.device.device_id),
        shape,
        strides,
    })
}

/// Describes another DLPack producer. The capsule stays unconsumed and is kept until the call ends; its own
/// destructor then releases the export, so no ownership is taken here.
fn dlpack_arg<'py>(py: Python<'py>, func: &str, name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Arg<'py>> {
    let capsule = obj.call_method0(intern!(py, "__dlpack__")).map_err(|e| {
        invalid(py, func, name, "a tensor that can be exported through DLPack", e.value(py).to_string())
    })?;
    let t = read_capsule(py, func, name, &capsule)?;
    let (code, bits, lanes) = t.dtype;
    let Some(scalar) = dlpack_scalar(&DlDataType { code, bits, lanes }) else {
        let got = format!("DLPack type (code {code}, bits {bits}, lanes {lanes})");
        return Err(invalid(py, func, format!("{name}.dtype"), expected_dtypes(name), got));
    };
    let device = match t.device {
        (KDL_CPU, _) => Device::Host,
        (KDL_CUDA, id) => Device::Cuda(id),
        (other, _) => {
            return Err(invalid(
                py,
                func,
                format!("{name}.device"),
                "a cpu or cuda tensor",
                format!("DLPack device type {other}"),
            ));
        }
    };
    let ndim = t.shape.len();
    let strides = match t.strides {
        _ if ndim > MAX_NDIM => vec![0; ndim],
        Some(s) => s,
        None => flashmla::tensor::contiguous_strides(&t.shape)[..ndim].to_vec(),
    };
    let desc = make_desc(py, func, name, t.data, scalar, &t.shape, &strides, device)?;
    Ok(Arg { desc, framework: Framework::Dlpack, repr: Repr::Native, obj: obj.clone(), _capsule: Some(capsule) })
}

static NDARRAY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn is_ndarray(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    if let Some(cls) = NDARRAY.get(py) {
        return obj.is_instance(cls.bind(py));
    }
    let Some(np) = imported(py, "numpy")? else { return Ok(false) };
    let cls = NDARRAY.get_or_init(py, || np.getattr("ndarray").map(Bound::unbind).unwrap_or_else(|_| py.None()));
    if cls.is_none(py) {
        return Ok(false);
    }
    obj.is_instance(cls.bind(py))
}

/// Describes one tensor argument.
pub fn describe<'py>(
    py: Python<'py>,
    func: &str,
    name: &str,
    obj: &Bound<'py, PyAny>,
    hint: Option<ScalarType>,
) -> PyResult<Arg<'py>> {
    if let Some(torch) = Torch::get(py)?
        && obj.is_instance(torch.tensor.bind(py))?
    {
        return torch_arg(py, torch, func, name, obj, hint);
    }
    if is_ndarray(py, obj)? {
        return numpy_arg(py, func, name, obj, hint);
    }
    if obj.hasattr(intern!(py, "__dlpack__"))? {
        return dlpack_arg(py, func, name, obj);
    }
    Err(invalid(py, func, name, "a torch.Tensor, a numpy.ndarray or a DLPack tensor", type_name(obj)))
}

/// Describes an optional tensor argument (`None` → absent); `hint` as for [`describe`].
pub fn describe_opt<'py>(
    py: Python<'py>,
    func: &str,
    name: &str,
    obj: Option<&Bound<'py, PyAny>>,
    hint: Option<ScalarType>,
) -> PyResult<Option<Arg<'py>>> {
    match obj {
        Some(o) if !o.is_none() => describe(py, func, name, o, hint).map(Some),
        _ => Ok(None),
    }
}
