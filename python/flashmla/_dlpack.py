"""Reading tensors through the DLPack protocol, with ctypes only.

Any object with a ``__dlpack__`` method (``torch.Tensor``, ``numpy.ndarray``, CuPy, JAX, ...) hands out a
``PyCapsule`` named ``"dltensor"`` that holds a ``DLManagedTensor*``. This module reads the tensor's data pointer,
device, dtype, shape and strides out of it.

Ownership (DLPack spec, "Python specification for DLPack"): a consumer that *takes ownership* renames the capsule
to ``"used_dltensor"`` and must later call the tensor's ``deleter`` itself. We never take ownership: we only
*borrow* the tensor for the duration of one library call. The capsule keeps its name ``"dltensor"``, we hold a
reference to it while the C library runs, and when the last reference goes away the producer's capsule destructor
sees the unconsumed name and calls the deleter exactly once. So nothing leaks and nothing is freed twice, even if
the library call raises.

Only the legacy (unversioned) ``DLManagedTensor`` capsule is requested (no ``max_version`` argument): every
producer that supports DLPack >= 0.5 can produce it, and it carries everything we read.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, Optional, Tuple

# DLDeviceType values (dlpack.h).
KDL_CPU = 1
KDL_CUDA = 2
KDL_CUDA_HOST = 3
KDL_CUDA_MANAGED = 13

# DLDataTypeCode values (dlpack.h, v1.1).
KDL_INT = 0
KDL_UINT = 1
KDL_FLOAT = 2
KDL_BFLOAT = 4
KDL_BOOL = 6
KDL_FLOAT8_E4M3FN = 10


class DLDevice(ctypes.Structure):
    """``DLDevice``: device type and ordinal."""

    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    """``DLDataType``: type code, bits per lane, lanes."""

    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    """``DLTensor``. ``strides`` may be NULL (compact row-major); both are counted in elements."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    """``DLManagedTensor`` (legacy, unversioned)."""

    _fields_ = [
        ("dl_tensor", DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


_CAPSULE_NAME = b"dltensor"

_PyCapsule_IsValid = ctypes.pythonapi.PyCapsule_IsValid
_PyCapsule_IsValid.restype = ctypes.c_int
_PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]

_PyCapsule_GetPointer = ctypes.pythonapi.PyCapsule_GetPointer
_PyCapsule_GetPointer.restype = ctypes.c_void_p
_PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def compact_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Row-major strides, in elements, of a compact tensor of this shape."""
    n = len(shape)
    strides = [1] * n
    acc = 1
    for i in range(n - 1, -1, -1):
        strides[i] = acc
        extent = shape[i]
        acc *= extent if extent > 1 else 1
    return tuple(strides)


class BorrowedTensor:
    """What a DLPack capsule describes, plus the capsule itself (kept alive as long as this object lives).

    ``data`` already includes ``byte_offset``. ``strides`` are in elements and never None.
    """

    __slots__ = ("data", "device_type", "device_id", "dtype_code", "dtype_bits", "dtype_lanes", "shape", "strides",
                 "capsule")  # fmt: skip

    def __init__(self, data, device_type, device_id, dtype_code, dtype_bits, dtype_lanes, shape, strides, capsule):
        self.data: int = data
        self.device_type: int = device_type
        self.device_id: int = device_id
        self.dtype_code: int = dtype_code
        self.dtype_bits: int = dtype_bits
        self.dtype_lanes: int = dtype_lanes
        self.shape: Tuple[int, ...] = shape
        self.strides: Tuple[int, ...] = strides
        self.capsule: Any = capsule

    @property
    def ndim(self) -> int:
        return len(self.shape)


# DLTensor as laid out in memory (native alignment, 64-bit): data, device_type, device_id, ndim, dtype.code,
# dtype.bits, dtype.lanes, shape*, strides*, byte_offset. Unpacking the raw bytes is several times faster than
# walking the ctypes structure field by field, and this runs for every tensor argument of every call.
_DLTENSOR = struct.Struct("@PiiiBBHPPQ")
assert _DLTENSOR.size == ctypes.sizeof(DLTensor)
_INT64S = {n: struct.Struct(f"@{n}q") for n in range(1, 9)}


def read_capsule(capsule: Any) -> BorrowedTensor:
    """Reads an unconsumed ``"dltensor"`` capsule without taking ownership (see the module docs)."""
    try:
        # Fails (ValueError) unless the capsule is named exactly "dltensor".
        ptr = _PyCapsule_GetPointer(capsule, _CAPSULE_NAME)
    except ValueError:
        ptr = None
    if not ptr:
        raise TypeError(
            "__dlpack__() did not return a valid 'dltensor' capsule (an already consumed 'used_dltensor' "
            "capsule, or a versioned one)"
        )
    # dl_tensor is the first member of DLManagedTensor.
    (data, dev_type, dev_id, ndim, code, bits, lanes, shape_p, strides_p, offset) = _DLTENSOR.unpack(
        ctypes.string_at(ptr, _DLTENSOR.size)
    )
    if ndim < 0:
        raise TypeError(f"DLPack tensor has a negative ndim ({ndim})")
    if ndim:
        fmt = _INT64S.get(ndim) or struct.Struct(f"@{ndim}q")
        shape = fmt.unpack(ctypes.string_at(shape_p, 8 * ndim))
        if strides_p:
            strides = fmt.unpack(ctypes.string_at(strides_p, 8 * ndim))
        else:
            strides = compact_strides(shape)
    else:
        shape = strides = ()
    return BorrowedTensor(
        data=(data or 0) + offset,
        device_type=dev_type,
        device_id=dev_id,
        dtype_code=code,
        dtype_bits=bits,
        dtype_lanes=lanes,
        shape=shape,
        strides=strides,
        capsule=capsule,
    )


def borrow(obj: Any, stream: Optional[int] = None) -> BorrowedTensor:
    """Calls ``obj.__dlpack__`` and reads the result.

    ``stream`` is passed through as DLPack's ``stream`` argument when not None (``-1`` asks the producer for no
    synchronisation: we launch on the producer's own current stream).
    """
    fn = getattr(obj, "__dlpack__", None)
    if fn is None:
        raise TypeError(f"{type(obj).__module__}.{type(obj).__qualname__} does not implement __dlpack__")
    capsule = fn() if stream is None else fn(stream=stream)
    return read_capsule(capsule)
