# Type stub of the compiled module (crates/mla-python, PyO3): a compiled module carries no annotations of its own,
# and the package declares itself typed (py.typed), so type checkers read the signatures from here.
# tests/test_package.py checks this file against the module: the same names, parameters, kinds and defaults.
#
# Tensor arguments are `Any`: torch.Tensor, numpy.ndarray or another DLPack producer, none of them a dependency.

from typing import Any, overload

__version__: str
METADATA_WORDS: int
HEAD_DIM_K: int
HEAD_DIM_V: int

class FlashMLASchedMeta:
    """A tile schedule in upstream HEAD's style, filled by the first decode call that uses it."""

    def __init__(self) -> None: ...
    @property
    def have_initialized(self) -> bool: ...
    @property
    def tile_scheduler_metadata(self) -> Any | None: ...
    @property
    def num_splits(self) -> Any | None: ...
    @property
    def config(self) -> dict[str, Any] | None: ...

@overload
def get_mla_metadata() -> tuple[FlashMLASchedMeta, None]: ...
@overload
def get_mla_metadata(cache_seqlens: Any, num_heads_per_head_k: int, num_heads_k: int) -> tuple[Any, Any]: ...
def flash_mla_with_kvcache(
    q: Any,
    k_cache: Any,
    block_table: Any,
    cache_seqlens: Any,
    head_dim_v: int,
    tile_scheduler_metadata: Any | FlashMLASchedMeta,
    num_splits: Any | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    descale_q: Any | None = None,
    descale_k: Any | None = None,
    *,
    is_fp8_kvcache: bool = False,
    indices: Any | None = None,
    attn_sink: Any | None = None,
    extra_k_cache: Any | None = None,
    extra_indices_in_kvcache: Any | None = None,
    topk_length: Any | None = None,
    extra_topk_length: Any | None = None,
    dtype: str | None = None,
) -> tuple[Any, Any]: ...
def num_sm_parts(device: str, num_heads_per_head_k: int, num_heads_k: int) -> int: ...
def backend_info(device: object | None = None) -> dict[str, Any]: ...
def library_version() -> str: ...
def _describe(obj: Any, dtype: str | None = None) -> dict[str, Any]: ...
