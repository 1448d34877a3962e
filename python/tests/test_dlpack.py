"""The DLPack plumbing: what is read from a capsule, and that borrowing neither leaks nor frees twice."""

import ctypes
import gc
import sys

import numpy as np
import pytest

from flashmla import _dlpack, _lib
from flashmla._tensors import describe


def test_reads_pointer_shape_strides_and_offset():
    base = np.arange(4 * 6 * 8, dtype=np.int32).reshape(4, 6, 8)
    view = base[1:, ::2, 2:]  # a byte offset and non-compact strides
    b = _dlpack.borrow(view)
    assert b.data == view.ctypes.data
    assert b.shape == (3, 3, 6)
    assert b.strides == (48, 16, 1)
    assert (b.device_type, b.device_id) == (_dlpack.KDL_CPU, 0)
    assert (b.dtype_code, b.dtype_bits, b.dtype_lanes) == (_dlpack.KDL_INT, 32, 1)
    # Reading through the pointer gives the view's elements.
    first = ctypes.c_int32.from_address(b.data).value
    last = ctypes.c_int32.from_address(b.data + 4 * (2 * 48 + 2 * 16 + 5)).value
    assert (first, last) == (view[0, 0, 0], view[2, 2, 5])


def test_compact_strides_when_the_producer_gives_none():
    assert _dlpack.compact_strides((2, 3, 4)) == (12, 4, 1)
    assert _dlpack.compact_strides((0, 3)) == (3, 1)
    assert _dlpack.compact_strides(()) == ()


def test_borrowing_keeps_the_array_alive_then_releases_it():
    a = np.zeros((16, 16), dtype=np.float32)
    before = sys.getrefcount(a)
    b = _dlpack.borrow(a)
    assert sys.getrefcount(a) > before  # the capsule's manager context holds the array
    assert b.capsule is not None
    del b
    gc.collect()
    assert sys.getrefcount(a) == before  # the producer's deleter ran exactly once: no leak


def test_the_capsule_is_not_consumed():
    a = np.ones(3, dtype=np.float32)
    capsule = a.__dlpack__()
    _dlpack.read_capsule(capsule)
    is_valid = ctypes.pythonapi.PyCapsule_IsValid
    is_valid.restype = ctypes.c_int
    is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
    assert is_valid(capsule, b"dltensor") == 1  # still named "dltensor": its destructor will free it
    assert is_valid(capsule, b"used_dltensor") == 0


def test_a_consumed_capsule_is_refused():
    a = np.ones(3, dtype=np.float32)
    capsule = a.__dlpack__()
    set_name = ctypes.pythonapi.PyCapsule_SetName
    set_name.restype = ctypes.c_int
    set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
    used = ctypes.c_char_p(b"used_dltensor")
    assert set_name(capsule, used) == 0
    try:
        with pytest.raises(TypeError, match="used_dltensor"):
            _dlpack.read_capsule(capsule)
    finally:
        assert set_name(capsule, b"dltensor") == 0  # hand it back so that its destructor frees the tensor


def test_objects_without_dlpack():
    with pytest.raises(TypeError, match="__dlpack__"):
        _dlpack.borrow([1, 2, 3])


def test_describe_fills_the_c_descriptor():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.zeros((2, 3, 4, 576), dtype=ml_dtypes.bfloat16)[:, 1:]
    arg = describe("f", "q", a)
    d = arg.desc
    assert (d.dtype, d.ndim, d.device_type, d.device_id) == (_lib.DTYPE_BF16, 4, 1, 0)
    assert list(d.shape) == [2, 2, 4, 576]
    assert list(d.strides) == [3 * 4 * 576, 4 * 576, 576, 1]
    assert d.data == a.ctypes.data
    assert ctypes.sizeof(_lib.FlashmlaTensor) == 8 + 4 * 4 + 8 * 4 + 8 * 4


def test_describe_more_dims_than_the_abi_reports_ndim():
    a = np.zeros((1, 1, 1, 1, 2), dtype=np.int32)
    arg = describe("f", "x", a)
    assert arg.desc.ndim == 5  # the library rejects it by name (x.ndim)


def test_zero_size_arrays():
    a = np.zeros((0, 4), dtype=np.int32)
    arg = describe("f", "x", a)
    assert list(arg.desc.shape[:2]) == [0, 4]
