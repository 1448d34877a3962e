"""ctypes bindings of the C ABI (``include/flashmla.h``) and the mapping of its statuses to Python exceptions.

The shared library is the ``libflashmla.so`` bundled next to this file in the wheel. Set ``FLASHMLA_LIBRARY`` to
the path of another build to use that one instead (development against ``target/release/libflashmla.so``).
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
import threading
from typing import Dict, Optional, Tuple

from ._errors import (
    BackendUnavailableError,
    FlashMLARuntimeError,
    FlashMLAValueError,
    UnsupportedError,
)

#: The C ABI version these bindings were written against (``FLASHMLA_ABI_VERSION``).
ABI_VERSION = 1

#: ``FLASHMLA_MAX_NDIM``: length of ``flashmla_tensor.shape`` / ``strides``.
MAX_NDIM = 4
#: ``FLASHMLA_METADATA_WORDS``: int32 words per row of ``tile_scheduler_metadata``.
METADATA_WORDS = 8
#: ``FLASHMLA_HEAD_DIM_K`` / ``FLASHMLA_HEAD_DIM_V``.
HEAD_DIM_K = 576
HEAD_DIM_V = 512
#: Alignment given to workspaces (the ABI asks for 256 bytes or more).
WORKSPACE_ALIGN = 256

# flashmla_status
STATUS_OK = 0
STATUS_INVALID_ARGUMENT = 1
STATUS_UNSUPPORTED = 2
STATUS_UNAVAILABLE = 3
STATUS_BACKEND_ERROR = 4
STATUS_PANIC = 5

# flashmla_dtype
DTYPE_BF16 = 1
DTYPE_FP16 = 2
DTYPE_E4M3 = 3
DTYPE_F32 = 4
DTYPE_I32 = 5

DTYPE_NAMES = {
    DTYPE_BF16: "bf16",
    DTYPE_FP16: "fp16",
    DTYPE_E4M3: "e4m3",
    DTYPE_F32: "f32",
    DTYPE_I32: "i32",
}
DTYPE_SIZES = {DTYPE_BF16: 2, DTYPE_FP16: 2, DTYPE_E4M3: 1, DTYPE_F32: 4, DTYPE_I32: 4}

# flashmla_device_type (DLPack DLDeviceType values)
DEVICE_CPU = 1
DEVICE_CUDA = 2


class FlashmlaTensor(ctypes.Structure):
    """``flashmla_tensor``: a DLPack-shaped descriptor (strides in elements, ``byte_offset`` folded into data)."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * MAX_NDIM),
        ("strides", ctypes.c_int64 * MAX_NDIM),
    ]


_TENSOR_PACK = struct.Struct(f"@Piiii{MAX_NDIM}q{MAX_NDIM}q")
assert _TENSOR_PACK.size == ctypes.sizeof(FlashmlaTensor)
_ZEROS = (0,) * MAX_NDIM


def make_tensor(data: int, device_type: int, device_id: int, dtype: int, shape, strides) -> FlashmlaTensor:
    """A ``flashmla_tensor``. More than ``MAX_NDIM`` dims keep their true ``ndim`` (the library rejects it by name)
    and only the first ``MAX_NDIM`` extents; one ``struct.pack`` is much faster than setting fields one by one."""
    ndim = len(shape)
    if ndim <= MAX_NDIM:
        pad = _ZEROS[: MAX_NDIM - ndim]
        sh, st = tuple(shape) + pad, tuple(strides) + pad
    else:
        sh, st = tuple(shape[:MAX_NDIM]), tuple(strides[:MAX_NDIM])
    return FlashmlaTensor.from_buffer_copy(_TENSOR_PACK.pack(data, device_type, device_id, dtype, ndim, *sh, *st))


class FlashmlaCapabilities(ctypes.Structure):
    """``flashmla_capabilities``."""

    _fields_ = [
        ("backend", ctypes.c_char_p),
        ("device_name", ctypes.c_char_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("sm_count", ctypes.c_int32),
        ("compute_capability_major", ctypes.c_int32),
        ("compute_capability_minor", ctypes.c_int32),
        ("dtypes", ctypes.c_uint32),
        ("num_head_dims", ctypes.c_int32),
        ("head_dims_k", ctypes.c_int32 * 4),
        ("head_dims_v", ctypes.c_int32 * 4),
        ("any_page_size", ctypes.c_int32),
        ("num_page_sizes", ctypes.c_int32),
        ("page_sizes", ctypes.c_int32 * 16),
    ]


_P = ctypes.POINTER
_T = _P(FlashmlaTensor)
_status = ctypes.c_int32
_i64 = ctypes.c_int64
_vp = ctypes.c_void_p

# name: (restype, argtypes)
_PROTOTYPES = {
    "flashmla_abi_version": (ctypes.c_uint32, []),
    "flashmla_version": (ctypes.c_char_p, []),
    "flashmla_last_error_message": (ctypes.c_char_p, []),
    "flashmla_status_name": (ctypes.c_char_p, [ctypes.c_int32]),
    "flashmla_backend_open": (_status, [ctypes.c_char_p, ctypes.c_int32, _P(_vp)]),
    "flashmla_backend_free": (None, [_vp]),
    "flashmla_backend_capabilities": (_status, [_vp, _P(FlashmlaCapabilities)]),
    "flashmla_num_sm_parts": (_status, [_vp, _i64, _i64, _P(_i64)]),
    "flashmla_workspace_size": (_status, [_vp, _i64, _i64, _i64, _i64, ctypes.c_int32, _P(_i64)]),
    "flashmla_get_mla_metadata": (_status, [_vp, _T, _i64, _i64, _T, _T, _vp]),
    "flashmla_with_kvcache": (
        _status,
        [
            _vp,  # backend
            _T,  # q
            _T,  # k_cache
            _T,  # block_table
            _T,  # cache_seqlens
            _i64,  # head_dim_v
            _T,  # tile_scheduler_metadata
            _T,  # num_splits
            ctypes.c_float,  # softmax_scale (NaN: default)
            ctypes.c_int32,  # causal
            _T,  # descale_q (NULL: absent)
            _T,  # descale_k (NULL: absent)
            _T,  # out
            _T,  # lse
            _vp,  # workspace
            _i64,  # workspace_bytes
            _vp,  # stream
        ],
    ),
}

_lib: Optional[ctypes.CDLL] = None
_lib_lock = threading.Lock()


def library_path() -> str:
    """Path of the shared library that is (or will be) loaded."""
    override = os.environ.get("FLASHMLA_LIBRARY")
    if override:
        return override
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "libflashmla.so")


def lib() -> ctypes.CDLL:
    """The loaded library, with every prototype declared (loaded on first use)."""
    global _lib
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        path = library_path()
        if not os.path.exists(path):
            raise ImportError(
                f"flashmla: the shared library {path} is missing; build the wheel with scripts/build-wheel.sh "
                "(or set FLASHMLA_LIBRARY to a libflashmla.so)"
            )
        handle = ctypes.CDLL(path)
        for name, (restype, argtypes) in _PROTOTYPES.items():
            try:
                fn = getattr(handle, name)
            except AttributeError as e:
                raise ImportError(f"flashmla: {path} does not export {name} (an incompatible build?)") from e
            fn.restype = restype
            fn.argtypes = argtypes
        got = handle.flashmla_abi_version()
        if got != ABI_VERSION:
            raise ImportError(
                f"flashmla: {path} implements C ABI version {got}, this package needs version {ABI_VERSION}"
            )
        _lib = handle
        return handle


def last_error() -> str:
    """The calling thread's last error message from the library."""
    msg = lib().flashmla_last_error_message()
    return msg.decode("utf-8", "replace") if msg else ""


def check(status: int) -> None:
    """Raises the exception that matches a non-OK status, carrying the library's message."""
    if status == STATUS_OK:
        return
    message = last_error() or f"status {status}"
    name = (lib().flashmla_status_name(status) or b"FLASHMLA_STATUS_UNKNOWN").decode()
    if status == STATUS_INVALID_ARGUMENT:
        raise FlashMLAValueError(message, status=name)
    if status == STATUS_UNSUPPORTED:
        raise UnsupportedError(message, status=name)
    if status == STATUS_UNAVAILABLE:
        raise BackendUnavailableError(message, status=name)
    raise FlashMLARuntimeError(message, status=name)


def library_version() -> str:
    """The library's version string."""
    return lib().flashmla_version().decode()


class Backend:
    """An opened backend handle (``flashmla_backend*``), bound to one device. Lives for the process."""

    def __init__(self, name: str, ordinal: int):
        handle = ctypes.c_void_p()
        check(lib().flashmla_backend_open(name.encode(), ordinal, ctypes.byref(handle)))
        self.handle = handle
        self.name = name
        self.ordinal = ordinal
        caps = FlashmlaCapabilities()
        check(lib().flashmla_backend_capabilities(handle, ctypes.byref(caps)))
        self.capabilities = caps
        self.device_name = (caps.device_name or b"").decode("utf-8", "replace")
        self.sm_count = int(caps.sm_count)

    def num_sm_parts(self, num_heads_per_head_k: int, num_heads_k: int) -> int:
        """Rows of ``tile_scheduler_metadata`` for this step shape."""
        out = ctypes.c_int64()
        check(lib().flashmla_num_sm_parts(self.handle, num_heads_per_head_k, num_heads_k, ctypes.byref(out)))
        return int(out.value)

    def workspace_size(self, batch: int, s_q: int, h_q: int, h_kv: int, dtype: int) -> int:
        """Bytes of workspace the decode step needs."""
        out = ctypes.c_int64()
        check(lib().flashmla_workspace_size(self.handle, batch, s_q, h_q, h_kv, dtype, ctypes.byref(out)))
        return int(out.value)

    def get_mla_metadata(self, cache_seqlens, num_heads_per_head_k, num_heads_k, meta, splits, stream) -> None:
        """``flashmla_get_mla_metadata`` on descriptors (``FlashmlaTensor``)."""
        check(
            lib().flashmla_get_mla_metadata(
                self.handle,
                ctypes.byref(cache_seqlens),
                num_heads_per_head_k,
                num_heads_k,
                ctypes.byref(meta),
                ctypes.byref(splits),
                stream,
            )
        )

    def with_kvcache(
        self,
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v: int,
        meta,
        splits,
        softmax_scale: Optional[float],
        causal: bool,
        descale_q,
        descale_k,
        out,
        lse,
        workspace: int,
        workspace_bytes: int,
        stream,
    ) -> None:
        """``flashmla_with_kvcache`` on descriptors; optional descriptors may be None."""
        scale = math.nan if softmax_scale is None else float(softmax_scale)
        check(
            lib().flashmla_with_kvcache(
                self.handle,
                ctypes.byref(q),
                ctypes.byref(k_cache),
                ctypes.byref(block_table),
                ctypes.byref(cache_seqlens),
                head_dim_v,
                ctypes.byref(meta),
                ctypes.byref(splits),
                scale,
                1 if causal else 0,
                None if descale_q is None else ctypes.byref(descale_q),
                None if descale_k is None else ctypes.byref(descale_k),
                ctypes.byref(out),
                ctypes.byref(lse),
                workspace or None,
                workspace_bytes,
                stream,
            )
        )


_backends: Dict[Tuple[str, int], Backend] = {}
_backends_lock = threading.Lock()


def backend(name: str, ordinal: int) -> Backend:
    """The cached handle of backend ``name`` on device ``ordinal``, opened on first use.

    A failed open is not cached, so a later call retries (e.g. after ``CUDA_VISIBLE_DEVICES`` issues are fixed).
    """
    key = (name, ordinal)
    b = _backends.get(key)
    if b is not None:
        return b
    with _backends_lock:
        b = _backends.get(key)
        if b is None:
            b = Backend(name, ordinal)
            _backends[key] = b
        return b
