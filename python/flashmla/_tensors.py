"""From framework tensors to ``flashmla_tensor`` descriptors, and output allocation through the caller's framework.

Which element type an argument has is decided here, from the framework's own dtype:

============================================  ====================  ==========================================
argument's dtype                              element type           how it is exported through DLPack
============================================  ====================  ==========================================
``torch.bfloat16``                            bf16                  as is (``kDLBfloat``)
``torch.float16`` / ``numpy.float16``         fp16                  as is
``torch.float8_e4m3fn``                       e4m3                  a ``uint8`` view (older PyTorch cannot
                                                                    export float8 through DLPack)
``ml_dtypes.bfloat16``                        bf16                  a ``uint16`` view (NumPy's DLPack export
                                                                    refuses custom dtypes)
``ml_dtypes.float8_e4m3fn``                   e4m3                  a ``uint8`` view
``uint16`` / ``int16`` + ``dtype="bf16"``     bf16 (raw bits)       as is
``uint16`` / ``int16`` + ``dtype="fp16"``     fp16 (raw bits)       as is
``uint8`` / ``int8`` + ``dtype="e4m3"``       e4m3 (raw bits)       as is
``float32``, ``int32``                        f32, i32              as is
another ``__dlpack__`` producer               from its DLDataType   as is
============================================  ====================  ==========================================

The reinterpreting views never copy: same element size, same shape and strides.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from . import _dlpack
from . import _lib
from ._errors import invalid

# What a caller may pass as the ``dtype=`` hint for raw-bit integer arrays.
HINTS = {
    "bf16": _lib.DTYPE_BF16,
    "bfloat16": _lib.DTYPE_BF16,
    "fp16": _lib.DTYPE_FP16,
    "float16": _lib.DTYPE_FP16,
    "e4m3": _lib.DTYPE_E4M3,
    "float8_e4m3fn": _lib.DTYPE_E4M3,
}

# (DLDataType code, bits) of each element type, as exported (see the module table).
_DL_TYPES = {
    _lib.DTYPE_BF16: {(_dlpack.KDL_BFLOAT, 16), (_dlpack.KDL_UINT, 16), (_dlpack.KDL_INT, 16)},
    _lib.DTYPE_FP16: {(_dlpack.KDL_FLOAT, 16), (_dlpack.KDL_UINT, 16), (_dlpack.KDL_INT, 16)},
    _lib.DTYPE_E4M3: {(_dlpack.KDL_FLOAT8_E4M3FN, 8), (_dlpack.KDL_UINT, 8), (_dlpack.KDL_INT, 8)},
    _lib.DTYPE_F32: {(_dlpack.KDL_FLOAT, 32)},
    _lib.DTYPE_I32: {(_dlpack.KDL_INT, 32)},
}

# Representations of an element type in NumPy (decides the dtype of outputs).
REPR_NATIVE = "native"  # a real dtype of the framework (torch.bfloat16, numpy.float16, ml_dtypes.bfloat16)
REPR_BITS = "bits"  # raw bits in an integer array plus a dtype= hint


def _torch():
    return sys.modules.get("torch")


def _numpy():
    return sys.modules.get("numpy")


def is_torch(obj: Any) -> bool:
    """True for a ``torch.Tensor`` (without importing torch)."""
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


def is_numpy(obj: Any) -> bool:
    """True for a ``numpy.ndarray`` (without importing numpy)."""
    np = _numpy()
    return np is not None and isinstance(obj, np.ndarray)


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _dtype_name(obj: Any) -> str:
    d = getattr(obj, "dtype", None)
    return str(d) if d is not None else _type_name(obj)


@dataclass
class Arg:
    """A tensor argument, described for the C library. Holds everything that must stay alive during the call."""

    name: str
    desc: _lib.FlashmlaTensor
    framework: str  # "torch", "numpy" or "dlpack"
    device_type: int  # DLPack device type
    device_id: int
    dtype: int  # flashmla_dtype code
    repr: str  # REPR_NATIVE or REPR_BITS
    shape: Tuple[int, ...]
    obj: Any  # the caller's object
    keep: List[Any] = field(default_factory=list)  # capsules and views

    @property
    def is_cuda(self) -> bool:
        return self.device_type == _dlpack.KDL_CUDA

    @property
    def data(self) -> int:
        return int(self.desc.data or 0)


def _torch_dtype_code(t: Any, hint: Optional[int]) -> Tuple[Optional[int], str, Any]:
    """(element type, representation, tensor to export) of a torch tensor."""
    torch = _torch()
    native = {
        torch.bfloat16: _lib.DTYPE_BF16,
        torch.float16: _lib.DTYPE_FP16,
        torch.float32: _lib.DTYPE_F32,
        torch.int32: _lib.DTYPE_I32,
    }
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None and t.dtype == fp8:
        return _lib.DTYPE_E4M3, REPR_NATIVE, t.view(torch.uint8)
    if t.dtype in native:
        return native[t.dtype], REPR_NATIVE, t
    if hint is not None:
        bits16 = {torch.int16, getattr(torch, "uint16", torch.int16)}
        bits8 = {torch.uint8, torch.int8}
        if (hint in (_lib.DTYPE_BF16, _lib.DTYPE_FP16) and t.dtype in bits16) or (
            hint == _lib.DTYPE_E4M3 and t.dtype in bits8
        ):
            return hint, REPR_BITS, t
    return None, REPR_NATIVE, t


# NumPy dtype name -> (element type, representation, integer view to export or None). ml_dtypes registers
# "bfloat16" and "float8_e4m3fn"; matching by name keeps ml_dtypes optional (and is faster than dtype equality).
_NUMPY_TYPES = {
    "float16": (_lib.DTYPE_FP16, REPR_NATIVE, None),
    "float32": (_lib.DTYPE_F32, REPR_NATIVE, None),
    "int32": (_lib.DTYPE_I32, REPR_NATIVE, None),
    "bfloat16": (_lib.DTYPE_BF16, REPR_NATIVE, "uint16"),
    "float8_e4m3fn": (_lib.DTYPE_E4M3, REPR_NATIVE, "uint8"),
}
_NUMPY_BITS = {
    _lib.DTYPE_BF16: ("uint16", "int16"),
    _lib.DTYPE_FP16: ("uint16", "int16"),
    _lib.DTYPE_E4M3: ("uint8", "int8"),
}


def _numpy_dtype_code(a: Any, hint: Optional[int]) -> Tuple[Optional[int], str, Any]:
    """(element type, representation, array to export) of a NumPy array."""
    dt = a.dtype
    name = dt.name
    if not dt.isnative:
        return None, REPR_NATIVE, a  # byte-swapped data cannot be handed to the library
    known = _NUMPY_TYPES.get(name)
    if known is not None:
        code, rep, view = known
        return code, rep, a if view is None else a.view(view)
    if hint is not None and name in _NUMPY_BITS.get(hint, ()):
        return hint, REPR_BITS, a
    return None, REPR_NATIVE, a


def _dlpack_dtype_code(b: _dlpack.BorrowedTensor) -> Optional[int]:
    if b.dtype_lanes != 1:
        return None
    exact = {
        (_dlpack.KDL_BFLOAT, 16): _lib.DTYPE_BF16,
        (_dlpack.KDL_FLOAT, 16): _lib.DTYPE_FP16,
        (_dlpack.KDL_FLOAT8_E4M3FN, 8): _lib.DTYPE_E4M3,
        (_dlpack.KDL_FLOAT, 32): _lib.DTYPE_F32,
        (_dlpack.KDL_INT, 32): _lib.DTYPE_I32,
    }
    return exact.get((b.dtype_code, b.dtype_bits))


def _numpy_borrow(a: Any) -> _dlpack.BorrowedTensor:
    """DLPack export of a NumPy array; read-only arrays (which NumPy refuses to export through the unversioned
    protocol) are read through ``__array_interface__`` instead. The library only reads inputs."""
    try:
        return _dlpack.borrow(a)
    except BufferError:
        if a.flags.writeable:
            raise
    iface = a.__array_interface__
    item = a.dtype.itemsize
    if iface.get("strides") is None:
        strides = _dlpack.compact_strides(a.shape)
    else:
        if any(s % item for s in iface["strides"]):
            raise BufferError("strides that are not a multiple of the element size")
        strides = tuple(s // item for s in iface["strides"])
    return _dlpack.BorrowedTensor(
        data=int(iface["data"][0]),
        device_type=_dlpack.KDL_CPU,
        device_id=0,
        dtype_code={"i": _dlpack.KDL_INT, "u": _dlpack.KDL_UINT, "f": _dlpack.KDL_FLOAT}.get(a.dtype.kind, -1),
        dtype_bits=item * 8,
        dtype_lanes=1,
        shape=tuple(int(s) for s in a.shape),
        strides=strides,
        capsule=a,
    )


def describe(func: str, name: str, obj: Any, hint: Optional[int] = None) -> Arg:
    """Describes one tensor argument for the library (borrowing it through DLPack).

    Raises :class:`~flashmla.FlashMLAValueError` (in the library's message format) when the object cannot be
    described at all: not a tensor, or an element type the C ABI has no code for. Everything else (shape, strides,
    device, which dtype this argument needs) is left to the library to check, so its messages reach the caller.
    """
    if is_torch(obj):
        framework = "torch"
        t = obj.detach() if obj.requires_grad else obj
        code, rep, export = _torch_dtype_code(t, hint)
        if code is None:
            raise invalid(func, f"{name}.dtype", _expected_dtypes(name), _dtype_name(obj))
        # CUDA: we launch on PyTorch's current stream ourselves, so the producer must not synchronise (-1).
        try:
            if export.device.type == "cuda":
                torch = _torch()
                index = export.device.index
                if index is not None and index != torch.cuda.current_device():
                    # Recent PyTorch refuses to export a tensor of another device than the current one.
                    with torch.cuda.device(index):
                        b = _dlpack.borrow(export, stream=-1)
                else:
                    b = _dlpack.borrow(export, stream=-1)
            else:
                b = _dlpack.borrow(export)
        except (BufferError, RuntimeError, TypeError, AssertionError) as e:
            raise invalid(func, name, "a tensor that can be exported through DLPack", f"{e}") from e
    elif is_numpy(obj):
        framework = "numpy"
        code, rep, export = _numpy_dtype_code(obj, hint)
        if code is None:
            raise invalid(func, f"{name}.dtype", _expected_dtypes(name), _dtype_name(obj))
        try:
            b = _numpy_borrow(export)
        except BufferError as e:
            raise invalid(func, name, "an array that can be exported through DLPack", f"{e}") from e
    elif hasattr(obj, "__dlpack__"):
        framework = "dlpack"
        rep = REPR_NATIVE
        export = obj
        try:
            b = _dlpack.borrow(obj)
        except (BufferError, RuntimeError, TypeError) as e:
            raise invalid(func, name, "a tensor that can be exported through DLPack", f"{e}") from e
        code = _dlpack_dtype_code(b)
        if code is None:
            raise invalid(
                func,
                f"{name}.dtype",
                _expected_dtypes(name),
                f"DLPack type (code {b.dtype_code}, bits {b.dtype_bits}, lanes {b.dtype_lanes})",
            )
    else:
        raise invalid(func, name, "a torch.Tensor, a numpy.ndarray or a DLPack tensor", _type_name(obj))

    if (b.dtype_code, b.dtype_bits) not in _DL_TYPES[code] or b.dtype_lanes != 1:
        # Cannot happen with the frameworks above; guards a producer whose export disagrees with its dtype.
        raise invalid(
            func,
            f"{name}.dtype",
            f"a DLPack export matching {_lib.DTYPE_NAMES[code]}",
            f"(code {b.dtype_code}, bits {b.dtype_bits}, lanes {b.dtype_lanes})",
        )

    d = _lib.make_tensor(b.data, b.device_type, b.device_id, code, b.shape, b.strides)
    return Arg(
        name=name,
        desc=d,
        framework=framework,
        device_type=b.device_type,
        device_id=b.device_id,
        dtype=code,
        repr=rep,
        shape=b.shape,
        obj=obj,
        keep=[b.capsule, export],
    )


def _expected_dtypes(name: str) -> str:
    base = name.split(".")[0]
    if base in ("q", "k_cache"):
        return (
            "bfloat16, float16 or float8_e4m3fn (NumPy: ml_dtypes.bfloat16, numpy.float16, "
            "ml_dtypes.float8_e4m3fn, or uint16/uint8 raw bits with dtype='bf16'/'fp16'/'e4m3')"
        )
    if base in ("descale_q", "descale_k"):
        return "float32"
    return "int32"


# ---------------------------------------------------------------------------------------------------------------
# Allocation through the caller's framework


def _torch_dtype(code: int):
    torch = _torch()
    return {
        _lib.DTYPE_BF16: torch.bfloat16,
        _lib.DTYPE_FP16: torch.float16,
        _lib.DTYPE_F32: torch.float32,
        _lib.DTYPE_I32: torch.int32,
    }[code]


def _numpy_dtype(code: int, rep: str):
    np = _numpy()
    if code == _lib.DTYPE_BF16:
        if rep == REPR_NATIVE:
            import ml_dtypes  # present: the caller passed ml_dtypes arrays

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(np.uint16)
    return {
        _lib.DTYPE_FP16: np.dtype(np.float16),
        _lib.DTYPE_F32: np.dtype(np.float32),
        _lib.DTYPE_I32: np.dtype(np.int32),
    }[code]


class Allocator:
    """Allocates outputs with the framework and on the device of a reference argument.

    torch: ``torch.empty`` on the reference tensor's device (PyTorch's caching allocator, so allocations are legal
    inside ``torch.cuda.graph`` capture). numpy (and other CPU producers): ``numpy.empty``.
    """

    def __init__(self, func: str, ref: Arg):
        self.func = func
        self.ref = ref
        if ref.framework == "torch":
            self.kind = "torch"
            self.device = ref.obj.device
        elif ref.device_type == _dlpack.KDL_CUDA:
            raise invalid(
                func,
                ref.name,
                "a torch.Tensor for CUDA inputs (outputs are allocated with the caller's framework; wrap other "
                "CUDA arrays with torch.from_dlpack, which does not copy)",
                _type_name(ref.obj),
            )
        else:
            self.kind = "numpy"
            self.device = None
            if _numpy() is None:
                import numpy  # noqa: F401  (a DLPack CPU producer without NumPy loaded yet)

    def empty(self, name: str, shape: Sequence[int], code: int, rep: str = REPR_NATIVE) -> Arg:
        """A new uninitialised tensor of element type ``code``, described for the library."""
        shape = tuple(int(s) for s in shape)
        if self.kind == "torch":
            torch = _torch()
            obj = torch.empty(shape, dtype=_torch_dtype(code), device=self.device)
        else:
            np = _numpy()
            obj = np.empty(shape, dtype=_numpy_dtype(code, rep))
        return describe(self.func, name, obj, hint=code if rep == REPR_BITS else None)

    def workspace(self, nbytes: int) -> Tuple[Any, int]:
        """A byte buffer of at least ``nbytes`` bytes aligned to ``WORKSPACE_ALIGN``: (owner, address)."""
        if nbytes <= 0:
            return None, 0
        align = _lib.WORKSPACE_ALIGN
        if self.kind == "torch":
            torch = _torch()
            buf = torch.empty((nbytes + align,), dtype=torch.uint8, device=self.device)
            base = buf.data_ptr()
        else:
            np = _numpy()
            buf = np.empty((nbytes + align,), dtype=np.uint8)
            base = buf.ctypes.data
        return buf, (base + align - 1) // align * align

    def stream(self) -> Optional[int]:
        """The CUDA stream to launch on: PyTorch's current stream of the reference device (None on the CPU)."""
        if self.kind == "torch" and self.device.type == "cuda":
            torch = _torch()
            return int(torch.cuda.current_stream(self.device).cuda_stream) or None
        return None
