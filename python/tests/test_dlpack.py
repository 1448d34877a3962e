"""What the library is handed for each kind of argument (``flashmla._native._describe``), and that reading a DLPack
producer neither consumes, leaks nor frees its export twice."""

import ctypes
import gc
import sys

import numpy as np
import pytest

from flashmla import _native


class Producer:
    """A minimal third-party DLPack producer around a NumPy array."""

    def __init__(self, a):
        self.a = a
        self.capsules = []

    def __dlpack__(self, stream=None):
        c = self.a.__dlpack__()
        self.capsules.append(c)
        return c

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_numpy_pointer_shape_strides_and_offset():
    base = np.arange(4 * 6 * 8, dtype=np.int32).reshape(4, 6, 8)
    view = base[1:, ::2, 2:]  # a byte offset and non-compact strides
    d = _native._describe(view)
    assert d["data"] == view.ctypes.data
    assert d["shape"] == [3, 3, 6]
    assert d["strides"] == [48, 16, 1]
    assert (d["dtype"], d["device"]) == ("i32", "host")
    first = ctypes.c_int32.from_address(d["data"]).value
    last = ctypes.c_int32.from_address(d["data"] + 4 * (2 * 48 + 2 * 16 + 5)).value
    assert (first, last) == (view[0, 0, 0], view[2, 2, 5])


def test_read_only_arrays_are_described_too():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    a.flags.writeable = False
    d = _native._describe(a)
    assert d["data"] == a.ctypes.data and d["shape"] == [3, 4]


def test_ml_dtypes_arrays():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.zeros((2, 3, 4, 576), dtype=ml_dtypes.bfloat16)[:, 1:]
    d = _native._describe(a)
    assert (d["dtype"], d["shape"]) == ("bf16", [2, 2, 4, 576])
    assert d["strides"] == [3 * 4 * 576, 4 * 576, 576, 1]
    assert d["data"] == a.ctypes.data
    e = _native._describe(np.zeros(5, dtype=ml_dtypes.float8_e4m3fn))
    assert e["dtype"] == "e4m3"


def test_raw_bits_need_a_hint():
    a = np.zeros(4, dtype=np.uint16)
    assert _native._describe(a, "bf16")["dtype"] == "bf16"
    with pytest.raises(ValueError, match="obj.dtype"):
        _native._describe(a)
    with pytest.raises(ValueError, match=r"_describe: invalid argument `dtype`: expected None or one of .*got \"bf17\""):
        _native._describe(a, "bf17")


def test_other_producers_read_through_dlpack():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, 1:]
    p = Producer(a)
    d = _native._describe(p)
    assert d["data"] == a.ctypes.data and d["shape"] == [4, 5] and d["strides"] == [6, 1]


def test_the_capsule_is_not_consumed_and_is_released_once():
    a = np.zeros((16, 16), dtype=np.float32)
    before = sys.getrefcount(a)
    p = Producer(a)
    _native._describe(p)
    is_valid = ctypes.pythonapi.PyCapsule_IsValid
    is_valid.restype = ctypes.c_int
    is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
    assert is_valid(p.capsules[0], b"dltensor") == 1  # still unconsumed: its destructor frees the export
    p.capsules.clear()
    del p
    gc.collect()
    assert sys.getrefcount(a) == before  # the producer's deleter ran exactly once: no leak


def test_a_consumed_capsule_is_refused():
    a = np.ones(3, dtype=np.float32)
    capsule = a.__dlpack__()
    set_name = ctypes.pythonapi.PyCapsule_SetName
    set_name.restype = ctypes.c_int
    set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
    used = ctypes.c_char_p(b"used_dltensor")

    class Consumed:
        def __dlpack__(self, stream=None):
            return capsule

    assert set_name(capsule, used) == 0
    try:
        with pytest.raises(ValueError, match="unconsumed"):
            _native._describe(Consumed())
    finally:
        assert set_name(capsule, b"dltensor") == 0  # hand it back so that its destructor frees the tensor


def test_objects_that_are_not_tensors():
    with pytest.raises(ValueError, match="a torch.Tensor, a numpy.ndarray or a DLPack tensor"):
        _native._describe([1, 2, 3])


def test_more_dims_than_four_are_rejected_by_name():
    with pytest.raises(ValueError, match="obj.ndim"):
        _native._describe(np.zeros((1, 1, 1, 1, 2), dtype=np.int32))


def test_zero_size_arrays():
    assert _native._describe(np.zeros((0, 4), dtype=np.int32))["shape"] == [0, 4]
