"""flashmla: multi-head latent attention (MLA) decoding with upstream FlashMLA's Python API.

A drop-in for ``flash_mla`` (DeepSeek's FlashMLA), compiled from the flashmla-rs Rust library: the two functions are
implemented in the extension module ``flashmla._native`` (PyO3, stable ABI), so a call reaches the Rust API with no
Python frame in between. ::

    import flashmla
    tile_scheduler_metadata, num_splits = flashmla.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flashmla.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, 512, tile_scheduler_metadata, num_splits, causal=True)

Upstream HEAD's calling convention works too: ``sched, _ = flashmla.get_mla_metadata()`` returns an empty
:class:`FlashMLASchedMeta` that the first ``flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
sched, None, ...)`` fills (the scheduler step runs on that call's ``cache_seqlens``); the other layers of the step
reuse it. Reusing it with other shapes raises :class:`FlashMLAValueError` naming the shape.

Arguments of ``flash_mla_with_kvcache`` (upstream's, in its order): ``q`` ``(batch, s_q, h_q, 576)`` bfloat16 /
float16 / float8_e4m3fn; ``k_cache`` ``(num_blocks, page_size, h_kv, 576)`` of q's dtype (V = its first 512
columns); ``block_table`` int32 ``(batch, max_blocks_per_seq)``; ``cache_seqlens`` int32 ``(batch,)``;
``head_dim_v`` = 512; the scheduler's output; ``softmax_scale`` (default ``576 ** -0.5``); ``causal``
(bottom-right aligned); ``descale_q``, ``descale_k``: float32 ``(1,)``, required for float8_e4m3fn inputs (real
values = stored · descale). Returns ``(out, lse)``: ``out`` ``(batch, s_q, h_q, 512)`` (bfloat16 for float8
inputs, else q's dtype), ``lse`` float32 ``(batch, h_q, s_q)``, natural log. A row that sees no key gets ``out = 0``
and ``lse = +inf``.

Where the work runs:

- CUDA ``torch.Tensor``: the ``hopper`` backend of the tensor's device, on PyTorch's current stream of that device;
  outputs, metadata and the split-KV workspace come from ``torch.empty`` (PyTorch's caching allocator), so both calls
  can be captured in a ``torch.cuda.graph``. Nothing synchronises.
- CPU ``torch.Tensor`` and ``numpy.ndarray`` (and other CPU DLPack producers): the ``cpu`` backend (exact,
  deterministic); outputs are of the caller's framework.

NumPy has no bfloat16 or float8 dtype: pass ``ml_dtypes.bfloat16`` / ``ml_dtypes.float8_e4m3fn`` arrays
(``pip install ml-dtypes``), ``numpy.float16`` arrays, or raw bits in ``uint16`` / ``uint8`` arrays with
``dtype="bf16"`` / ``"fp16"`` / ``"e4m3"``; :mod:`flashmla.bits` converts float32 to and from raw bits.

``torch.compile``: ``torch.ops.flashmla.get_mla_metadata`` and ``torch.ops.flashmla.flash_mla_with_kvcache`` are
registered with ``torch.library`` (with fake implementations) as soon as both torch and flashmla are imported
(:mod:`flashmla.ops`), so a compiled decode step that calls them traces without graph breaks. The plain functions
above are the fast eager path.

Errors are :class:`FlashMLAValueError` (a ``ValueError``) for invalid arguments, with the library's message naming
the argument, the expected and the actual value, and :class:`FlashMLARuntimeError` (a ``RuntimeError``) otherwise.
"""

from __future__ import annotations

import sys as _sys

from . import _native
from ._errors import (
    BackendUnavailableError,
    FlashMLAError,
    FlashMLARuntimeError,
    FlashMLAValueError,
    UnsupportedError,
)
from ._native import (
    FlashMLASchedMeta,
    backend_info,
    flash_mla_with_kvcache,
    get_mla_metadata,
    library_version,
)

__version__ = _native.__version__

__all__ = [
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "FlashMLASchedMeta",
    "backend_info",
    "library_version",
    "bits",
    "ops",
    "FlashMLAError",
    "FlashMLAValueError",
    "FlashMLARuntimeError",
    "UnsupportedError",
    "BackendUnavailableError",
    "__version__",
]


def __getattr__(name: str):
    # flashmla.bits needs NumPy and flashmla.ops needs torch: import them on first use, so that users of one
    # framework never import the other.
    if name in ("bits", "ops"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'flashmla' has no attribute {name!r}")


if "torch" in _sys.modules:
    # torch is there already: register torch.ops.flashmla.* now, so that torch.compile finds them.
    from . import ops  # noqa: F401
