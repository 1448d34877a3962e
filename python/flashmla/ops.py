"""``torch.ops.flashmla.*``: flashmla's two functions as PyTorch custom operators (``torch.library``).

Importing this module registers

- ``torch.ops.flashmla.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k) -> (Tensor, Tensor)``
- ``torch.ops.flashmla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
  tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False, descale_q=None, descale_k=None)
  -> (Tensor, Tensor)``
- ``torch.ops.flashmla.flash_mla_with_fp8_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
  softmax_scale=None, causal=False, indices=None, attn_sink=None, extra_k_cache=None,
  extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None) -> (Tensor, Tensor)``: the decode over
  an FP8 cache (``is_fp8_kvcache=True``), scheduler step included

with fake (meta) implementations that give the outputs' shapes and dtypes without running anything, so that
``torch.compile(fullgraph=True)`` traces a decode step calling them without a graph break, and ``torch.export``
can capture it. ``import flashmla`` imports this module by itself when torch is already imported.

The custom-operator dispatcher costs a few microseconds per call in eager mode, so the plain
``flashmla.flash_mla_with_kvcache`` (the compiled function itself) stays the fast eager path; use these ops in code
that ``torch.compile`` traces. The dense ops take upstream's 2025 calling convention (tensors from the scheduler
step): a ``FlashMLASchedMeta`` is a Python object that a compiled graph cannot carry. The FP8-cache decode has no
2025 form (its schedule depends on the selection lengths), so its op runs the scheduler step itself on every call.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _native

if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):
    raise ImportError(
        f"flashmla.ops needs torch.library.custom_op (PyTorch >= 2.4); this PyTorch is {torch.__version__}"
    )


@torch.library.custom_op("flashmla::get_mla_metadata", mutates_args=())
def get_mla_metadata(
    cache_seqlens: torch.Tensor, num_heads_per_head_k: int, num_heads_k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The scheduler step (see :func:`flashmla.get_mla_metadata`)."""
    meta, splits = _native.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
    return meta, splits


@get_mla_metadata.register_fake
def _get_mla_metadata_fake(cache_seqlens, num_heads_per_head_k, num_heads_k):
    # num_sm_parts depends only on the device's SM count and the shape, never on the lengths.
    parts = _native.num_sm_parts(str(cache_seqlens.device), num_heads_per_head_k, num_heads_k)
    batch = cache_seqlens.shape[0]
    return (
        cache_seqlens.new_empty((parts, _native.METADATA_WORDS), dtype=torch.int32),
        cache_seqlens.new_empty((batch + 1,), dtype=torch.int32),
    )


@torch.library.custom_op("flashmla::flash_mla_with_kvcache", mutates_args=())
def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    descale_q: Optional[torch.Tensor] = None,
    descale_k: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The decode step (see :func:`flashmla.flash_mla_with_kvcache`)."""
    out, lse = _native.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal, descale_q, descale_k,
    )
    return out, lse


@flash_mla_with_kvcache.register_fake
def _flash_mla_with_kvcache_fake(
    q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
    softmax_scale=None, causal=False, descale_q=None, descale_k=None,
):
    batch, s_q, h_q, _ = q.shape
    fp8 = getattr(torch, "float8_e4m3fn", None)
    out_dtype = torch.bfloat16 if q.dtype == fp8 else q.dtype
    return (
        q.new_empty((batch, s_q, h_q, head_dim_v), dtype=out_dtype),
        q.new_empty((batch, h_q, s_q), dtype=torch.float32),
    )


@torch.library.custom_op("flashmla::flash_mla_with_fp8_kvcache", mutates_args=())
def flash_mla_with_fp8_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    head_dim_v: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices_in_kvcache: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The decode over an FP8 cache (see ``is_fp8_kvcache=True`` of :func:`flashmla.flash_mla_with_kvcache`), with
    a fresh schedule per call."""
    sched, _ = _native.get_mla_metadata()
    out, lse = _native.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, sched, None, softmax_scale, causal,
        is_fp8_kvcache=True, indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
        extra_topk_length=extra_topk_length,
    )
    return out, lse


@flash_mla_with_fp8_kvcache.register_fake
def _flash_mla_with_fp8_kvcache_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, *args, **kwargs):
    batch, s_q, h_q, _ = q.shape
    return (
        q.new_empty((batch, s_q, h_q, head_dim_v), dtype=torch.bfloat16),
        q.new_empty((batch, h_q, s_q), dtype=torch.float32),
    )
