"""Shared fixtures. The tests import `flashmla` as installed (scripts/test-python.sh installs the wheel into a
virtualenv and runs pytest from outside the source tree); FLASHMLA_LIBRARY may point at another libflashmla.so."""

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


class FakeCudaTensor:
    """A DLPack producer that claims to live on cuda:0, with a compact layout (the memory is never touched: used
    where the library must reject it, or the CUDA backend must be missing, before anything is read)."""

    def __init__(self, shape, code=0, bits=32):  # default: int32 (kDLInt)
        from flashmla import _dlpack

        self.shape = (ctypes.c_int64 * len(shape))(*shape)
        self.managed = _dlpack.DLManagedTensor()
        t = self.managed.dl_tensor
        t.data = 0x10000
        t.device.device_type = _dlpack.KDL_CUDA
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
