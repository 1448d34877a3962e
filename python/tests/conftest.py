"""Shared fixtures. The tests import `flashmla` as installed (scripts/test-python.sh installs the wheel into a
virtualenv and runs pytest from outside the source tree)."""

import ctypes
import os
import pathlib
import zlib

import numpy as np
import pytest


def repo_root() -> pathlib.Path:
    """The repository root (README.md lives there)."""
    env = os.environ.get("FLASHMLA_REPO_ROOT")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so every test (and parameter set) is reproducible on its own."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def require_gpu() -> bool:
    """FLASHMLA_REQUIRE_GPU=1 (the GPU workflow): GPU tests must run, not skip."""
    return os.environ.get("FLASHMLA_REQUIRE_GPU") == "1"


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
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
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


KDL_CUDA = 2


class FakeCudaTensor:
    """A DLPack producer that claims to live on cuda:0, with a compact layout (the memory is never touched: used
    where the library must reject it, or the CUDA backend must be missing, before anything is read)."""

    def __init__(self, shape, code=0, bits=32):  # default: int32 (kDLInt)
        self.shape = (ctypes.c_int64 * len(shape))(*shape)
        self.managed = DLManagedTensor()
        t = self.managed.dl_tensor
        t.data = 0x10000
        t.device.device_type = KDL_CUDA
        t.device.device_id = 0
        t.ndim = len(shape)
        t.dtype.code, t.dtype.bits, t.dtype.lanes = code, bits, 1
        t.shape = self.shape
        t.strides = None

    def __dlpack__(self, stream=None):
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self.managed), b"dltensor", None)  # no destructor: nothing to free

    def __dlpack_device__(self):
        return (2, 0)
