"""flashmla: multi-head latent attention (MLA) decoding with upstream FlashMLA's Python API.

A drop-in for ``flash_mla`` (DeepSeek's FlashMLA) built on the C ABI of flashmla-rs: the wheel bundles
``libflashmla.so`` and calls it through :mod:`ctypes`, so one wheel serves every Python and PyTorch version. ::

    import flashmla
    tile_scheduler_metadata, num_splits = flashmla.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flashmla.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, 512, tile_scheduler_metadata, num_splits, causal=True)

Tensors cross into the library through the DLPack protocol, so both ``torch.Tensor`` and ``numpy.ndarray`` work:

- CUDA tensors run on the ``hopper`` backend of the tensor's device, on PyTorch's current stream of that device
  (``torch.cuda.current_stream(device)``); outputs, metadata and the split-KV workspace are allocated with
  ``torch.empty`` (PyTorch's caching allocator), so both calls can be captured in a ``torch.cuda.graph``.
- CPU tensors and NumPy arrays run on the ``cpu`` backend (exact, deterministic); outputs are ``torch.empty`` on
  the CPU for torch inputs and ``numpy.empty`` for NumPy inputs.

NumPy has no bfloat16 or float8 dtype. NumPy users pass ``ml_dtypes.bfloat16`` / ``ml_dtypes.float8_e4m3fn``
arrays (``pip install ml-dtypes``), ``numpy.float16`` arrays, or raw bits in ``uint16`` / ``uint8`` arrays together
with ``dtype="bf16"`` / ``"fp16"`` / ``"e4m3"``; the helpers in :mod:`flashmla.bits` convert float32 to and from
raw bits. See ``docs/python.md``.

Errors from the library are raised as :class:`FlashMLAValueError` (a ``ValueError``) for invalid arguments and as
:class:`FlashMLARuntimeError` (a ``RuntimeError``) otherwise, with the library's message.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Tuple

from . import _lib
from ._errors import (
    BackendUnavailableError,
    FlashMLAError,
    FlashMLARuntimeError,
    FlashMLAValueError,
    UnsupportedError,
    invalid,
)
from ._tensors import HINTS, Allocator, Arg, describe

__version__ = "0.1.0"

__all__ = [
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "backend_info",
    "library_version",
    "bits",
    "FlashMLAError",
    "FlashMLAValueError",
    "FlashMLARuntimeError",
    "UnsupportedError",
    "BackendUnavailableError",
    "__version__",
]



def __getattr__(name: str):
    # flashmla.bits needs NumPy; import it on first use so that torch-only users need no NumPy.
    if name == "bits":
        import importlib

        return importlib.import_module(".bits", __name__)
    raise AttributeError(f"module 'flashmla' has no attribute {name!r}")


def _backend_for(func: str, ref: Arg) -> _lib.Backend:
    """The backend that runs tensors living where ``ref`` lives: ``hopper`` for CUDA, ``cpu`` otherwise."""
    if ref.is_cuda:
        try:
            return _lib.backend("hopper", ref.device_id)
        except BackendUnavailableError as e:
            raise BackendUnavailableError(
                f"{func}: CUDA tensors run on the `hopper` backend (sm_90a), which cannot run on cuda:"
                f"{ref.device_id}: {e}",
                status=e.status,
            ) from e
    return _lib.backend("cpu", 0)


def _int_arg(func: str, name: str, v: Any) -> int:
    try:
        return operator.index(v)
    except TypeError:
        raise invalid(func, name, "an integer", repr(v)) from None


def _hint(func: str, dtype: Optional[str]) -> Optional[int]:
    if dtype is None:
        return None
    code = HINTS.get(str(dtype).lower())
    if code is None:
        raise invalid(func, "dtype", f"None or one of {sorted(set(HINTS))}", repr(dtype))
    return code


def get_mla_metadata(cache_seqlens: Any, num_heads_per_head_k: int, num_heads_k: int) -> Tuple[Any, Any]:
    """The scheduler step: split the batch's KV blocks into balanced parts, once per decoding step.

    Args:
        cache_seqlens: ``(batch,)`` int32, contiguous: the KV length of each request (including the ``s_q`` new
            tokens). A CUDA ``torch.Tensor`` (runs on the Hopper backend of its device, on PyTorch's current
            stream), a CPU ``torch.Tensor`` or a ``numpy.ndarray`` (CPU backend).
        num_heads_per_head_k: ``s_q * h_q // h_kv``, the query rows that share one KV head.
        num_heads_k: ``h_kv``, the number of KV heads (1 for MLA).

    Returns:
        ``(tile_scheduler_metadata, num_splits)``: int32 ``(num_sm_parts, 8)`` and int32 ``(batch + 1,)``, of the
        same framework and on the same device as ``cache_seqlens``. ``num_sm_parts`` depends only on the shape
        and the device (``max(1, sm_count // h_kv // ceil(num_heads_per_head_k / 64))``), never on the lengths.
        Reuse both for every layer of the step; recompute them when the lengths change.

    Raises:
        FlashMLAValueError: an invalid argument (the library's message names it).
        BackendUnavailableError: a CUDA tensor on a machine where the Hopper backend cannot run (says why).
    """
    func = "get_mla_metadata"
    q_seq_per_hk = _int_arg(func, "num_heads_per_head_k", num_heads_per_head_k)
    h_kv = _int_arg(func, "num_heads_k", num_heads_k)
    seqlens = describe(func, "cache_seqlens", cache_seqlens)
    backend = _backend_for(func, seqlens)
    alloc = Allocator(func, seqlens)
    parts = backend.num_sm_parts(q_seq_per_hk, h_kv)
    batch = seqlens.shape[0] if len(seqlens.shape) == 1 else 0
    meta = alloc.empty("tile_scheduler_metadata", (parts, _lib.METADATA_WORDS), _lib.DTYPE_I32)
    splits = alloc.empty("num_splits", (max(batch, 0) + 1,), _lib.DTYPE_I32)
    backend.get_mla_metadata(seqlens.desc, q_seq_per_hk, h_kv, meta.desc, splits.desc, alloc.stream())
    return meta.obj, splits.obj


def flash_mla_with_kvcache(
    q: Any,
    k_cache: Any,
    block_table: Any,
    cache_seqlens: Any,
    head_dim_v: int,
    tile_scheduler_metadata: Any,
    num_splits: Any,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    descale_q: Any = None,
    descale_k: Any = None,
    *,
    dtype: Optional[str] = None,
) -> Tuple[Any, Any]:
    """The decode step: attention of ``q`` over the paged latent cache, once per layer.

    For request ``i``, query token ``t`` and head ``h`` (KV head ``g = h // (h_q // h_kv)``)::

        S[j] = softmax_scale * q[i, t, h, :576] . K_i[j, g, :576]          j < s_k = cache_seqlens[i]
        out[i, t, h] = sum_j softmax(S)[j] * K_i[j, g, :512]               (V = the first 512 columns of K)
        lse[i, h, t] = ln sum_j exp(S[j])

    where ``K_i[j]`` is row ``j % page_size`` of page ``block_table[i, j // page_size]``. A row that sees no key
    (``s_k == 0``, or causal with ``s_k < s_q``) gets ``out = 0`` and ``lse = +inf``.

    Args:
        q: ``(batch, s_q, h_q, 576)``, bfloat16 / float16 / float8_e4m3fn; last dimension contiguous.
        k_cache: ``(num_blocks, page_size, h_kv, 576)``, same dtype as ``q``; last dimension contiguous. Upstream
            requires ``page_size == 64``; the CPU backend accepts any page size.
        block_table: ``(batch, max_blocks_per_seq)`` int32: the pages of each request. Entries past a request's
            length are never read.
        cache_seqlens: ``(batch,)`` int32: KV length of each request (the ``s_q`` new tokens included).
        head_dim_v: must be 512.
        tile_scheduler_metadata, num_splits: from :func:`get_mla_metadata` for these ``cache_seqlens``.
        softmax_scale: default ``576 ** -0.5`` (``q.shape[-1] ** -0.5``).
        causal: bottom-right aligned causal mask over the last ``s_q`` tokens (token ``t`` sees keys
            ``j <= s_k - s_q + t``); no effect when ``s_q == 1``.
        descale_q, descale_k: float32 ``(1,)``, required for float8_e4m3fn inputs and rejected otherwise: the real
            values are ``q * descale_q`` and ``k_cache * descale_k`` (V uses ``descale_k``).
        dtype: only for raw-bit integer arrays (NumPy without ml_dtypes): ``"bf16"`` or ``"fp16"`` for
            ``uint16``/``int16`` ``q``/``k_cache``, ``"e4m3"`` for ``uint8``/``int8``. Not part of upstream's API.

    Returns:
        ``(out, lse)``: ``out`` is ``(batch, s_q, h_q, 512)`` with ``q``'s dtype (bfloat16 for float8_e4m3fn
        inputs; for raw-bit bf16/e4m3 inputs, ``uint16`` bfloat16 bits); ``lse`` is float32 ``(batch, h_q, s_q)``,
        natural log. Both are of ``q``'s framework and on ``q``'s device; CUDA work is enqueued on PyTorch's
        current stream and the call does not synchronise.

    Raises:
        FlashMLAValueError: an invalid argument: dtype, shape, stride, device, a missing or superfluous descale.
            The message is the library's and names the argument.
        BackendUnavailableError: CUDA inputs on a machine where the Hopper backend cannot run (says why).
        FlashMLARuntimeError: a failure inside the backend.
    """
    func = "flash_mla_with_kvcache"
    hint = _hint(func, dtype)
    head_dim_v = _int_arg(func, "head_dim_v", head_dim_v)
    if softmax_scale is not None:
        try:
            softmax_scale = float(softmax_scale)
        except (TypeError, ValueError):
            raise invalid(func, "softmax_scale", "None or a float", repr(softmax_scale)) from None
        if not math.isfinite(softmax_scale):  # NaN would mean "default" to the C ABI
            raise invalid(func, "softmax_scale", "a finite value > 0", repr(softmax_scale))
    qa = describe(func, "q", q, hint)
    ka = describe(func, "k_cache", k_cache, hint)
    bt = describe(func, "block_table", block_table)
    sl = describe(func, "cache_seqlens", cache_seqlens)
    meta = describe(func, "tile_scheduler_metadata", tile_scheduler_metadata)
    splits = describe(func, "num_splits", num_splits)
    dq = None if descale_q is None else describe(func, "descale_q", descale_q)
    dk = None if descale_k is None else describe(func, "descale_k", descale_k)

    backend = _backend_for(func, qa)
    alloc = Allocator(func, qa)

    # Output shapes come from q; a q the library will reject gets empty outputs, so that the library's own message
    # (which checks q before out) reaches the caller.
    if len(qa.shape) == 4:
        b, s_q, h_q, _ = (max(int(x), 0) for x in qa.shape)
    else:
        b = s_q = h_q = 0
    out_dtype = {_lib.DTYPE_BF16: _lib.DTYPE_BF16, _lib.DTYPE_E4M3: _lib.DTYPE_BF16}.get(qa.dtype, qa.dtype)
    if out_dtype not in (_lib.DTYPE_BF16, _lib.DTYPE_FP16):
        out_dtype = _lib.DTYPE_F32  # q's dtype is rejected by the library before out is looked at
    out = alloc.empty("out", (b, s_q, h_q, max(head_dim_v, 0)), out_dtype, qa.repr)
    lse = alloc.empty("lse", (b, h_q, s_q), _lib.DTYPE_F32)

    h_kv = int(ka.shape[2]) if len(ka.shape) == 4 else 1
    try:
        nbytes = backend.workspace_size(b, s_q, h_q, h_kv, qa.dtype)
    except FlashMLAValueError:
        nbytes = 0  # an invalid shape: the decode call below reports it in full
    ws_owner, ws_ptr = alloc.workspace(nbytes)

    backend.with_kvcache(
        qa.desc,
        ka.desc,
        bt.desc,
        sl.desc,
        head_dim_v,
        meta.desc,
        splits.desc,
        softmax_scale,
        bool(causal),
        None if dq is None else dq.desc,
        None if dk is None else dk.desc,
        out.desc,
        lse.desc,
        ws_ptr,
        nbytes,
        alloc.stream(),
    )
    # Everything the library read or wrote (capsules, views, workspace) stays referenced until here; on CUDA the
    # workspace goes back to PyTorch's caching allocator, which orders its reuse on the same stream.
    del ws_owner
    return out.obj, lse.obj


def backend_info(device: Any = "cpu") -> dict:
    """What the backend for ``device`` supports: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"`` / a ``torch.device``.

    Returns a dict with ``backend``, ``device_name``, ``sm_count``, ``compute_capability``, ``dtypes`` and
    ``page_sizes`` (None for any). Raises :class:`BackendUnavailableError` with the reason when the backend cannot
    run here.
    """
    text = str(device)
    if text == "cpu":
        b = _lib.backend("cpu", 0)
    elif text.startswith("cuda"):
        ordinal = int(text.split(":", 1)[1]) if ":" in text else 0
        b = _lib.backend("hopper", ordinal)
    else:
        raise invalid("backend_info", "device", "'cpu', 'cuda' or 'cuda:N'", repr(device))
    c = b.capabilities
    dtypes = [name for code, name in _lib.DTYPE_NAMES.items() if c.dtypes & (1 << code)]
    pages = None if c.any_page_size else [int(c.page_sizes[i]) for i in range(c.num_page_sizes)]
    cc = (int(c.compute_capability_major), int(c.compute_capability_minor))
    return {
        "backend": (c.backend or b"").decode(),
        "device_name": b.device_name,
        "sm_count": b.sm_count,
        "compute_capability": cc if cc != (0, 0) else None,
        "dtypes": dtypes,
        "page_sizes": pages,
    }


def library_version() -> str:
    """Version of the bundled ``libflashmla.so``."""
    return _lib.library_version()
