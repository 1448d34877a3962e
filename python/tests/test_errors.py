"""Argument errors: ValueError (FlashMLAValueError) with the library's message naming the argument."""

import ml_dtypes
import numpy as np
import pytest

import flashmla
from conftest import FakeCudaTensor
from flashmla import flash_mla_with_kvcache, get_mla_metadata
from mla_reference import D_V, check_outputs, make_case

LIB = "flash_mla_with_kvcache: invalid argument "  # the prefix of decode argument errors


@pytest.fixture
def case(rng):
    return make_case(rng, "bf16", 2, 2, 4, 1, [70, 10], causal=True)


def call(case, **over):
    args = dict(
        q=case.q,
        k_cache=case.k_cache,
        block_table=case.block_table,
        cache_seqlens=case.cache_seqlens,
        head_dim_v=D_V,
        tile_scheduler_metadata=None,
        num_splits=None,
        causal=True,
        descale_q=case.descale_q,
        descale_k=case.descale_k,
    )
    meta, splits = get_mla_metadata(case.cache_seqlens, 2 * 4, 1)
    args["tile_scheduler_metadata"], args["num_splits"] = meta, splits
    args.update(over)
    return flash_mla_with_kvcache(**args)


def expect_library_error(fn, arg):
    with pytest.raises(ValueError) as info:
        fn()
    e = info.value
    assert isinstance(e, flashmla.FlashMLAValueError) and not isinstance(e, RuntimeError)
    assert e.status == "FLASHMLA_STATUS_INVALID_ARGUMENT"
    msg = str(e)
    assert f"`{arg}`" in msg, msg
    assert "expected" in msg and "got" in msg, msg
    return msg


def test_sanity_the_fixture_call_succeeds(case):
    out, lse = call(case)
    assert out.shape == (2, 2, 4, D_V)


@pytest.mark.parametrize(
    "mutate,arg",
    [
        (lambda c: dict(q=c.q.astype(np.float32)), "q.dtype"),
        (lambda c: dict(k_cache=c.k_cache.astype(np.float16)), "k_cache.dtype"),
        (lambda c: dict(q=c.q[..., :512]), "q.shape[3]"),
        (lambda c: dict(q=c.q[0]), "q.ndim"),
        (lambda c: dict(q=np.swapaxes(np.ascontiguousarray(np.swapaxes(c.q, 2, 3)), 2, 3)), "q.strides[3]"),
        (lambda c: dict(k_cache=c.k_cache[..., :512]), "k_cache.shape[3]"),
        (lambda c: dict(head_dim_v=576), "head_dim_v"),
        (lambda c: dict(block_table=c.block_table[:1]), "block_table.shape[0]"),
        (lambda c: dict(cache_seqlens=c.cache_seqlens[:1]), "cache_seqlens.shape[0]"),
        (lambda c: dict(cache_seqlens=c.cache_seqlens.astype(np.float32)), "cache_seqlens.dtype"),
        (lambda c: dict(descale_q=np.ones(1, np.float32)), "descale_q"),
        (lambda c: dict(tile_scheduler_metadata=np.zeros((1000, 8), np.int32)), "tile_scheduler_metadata.shape[0]"),
        (lambda c: dict(tile_scheduler_metadata=np.zeros(8, np.int32)), "tile_scheduler_metadata.ndim"),
        (lambda c: dict(num_splits=np.zeros(7, np.int32)), "num_splits.shape[0]"),
        (lambda c: dict(softmax_scale=-1.0), "softmax_scale"),
    ],
)
def test_library_rejects(case, mutate, arg):
    msg = expect_library_error(lambda: call(case, **mutate(case)), arg)
    assert msg.startswith(LIB), msg


def test_metadata_of_another_batch(case, rng):
    other = np.array([5, 6, 7], dtype=np.int32)
    meta, splits = get_mla_metadata(other, 8, 1)
    msg = expect_library_error(
        lambda: call(case, tile_scheduler_metadata=meta, num_splits=splits), "num_splits.shape[0]"
    )
    assert msg.startswith(LIB)


def test_e4m3_needs_descales(rng):
    case = make_case(rng, "e4m3", 1, 1, 2, 1, [30])
    expect_library_error(lambda: call(case, descale_q=None), "descale_q")
    expect_library_error(lambda: call(case, descale_k=None), "descale_k")
    expect_library_error(lambda: call(case, descale_q=np.ones(2, np.float32)), "descale_q.shape[0]")
    expect_library_error(lambda: call(case, descale_k=np.ones(1, np.int32)), "descale_k.dtype")


def test_heads_must_divide(rng):
    case = make_case(rng, "bf16", 1, 1, 3, 1, [30])
    k2 = np.concatenate([case.k_cache, case.k_cache], axis=2)
    meta, splits = get_mla_metadata(case.cache_seqlens, 3, 1)
    expect_library_error(
        lambda: flash_mla_with_kvcache(case.q, k2, case.block_table, case.cache_seqlens, D_V, meta, splits),
        "q.shape[2]",
    )


@pytest.mark.parametrize(
    "mutate,arg",
    [
        (lambda c: dict(q=c.q.astype(np.float64)), "q.dtype"),
        (lambda c: dict(block_table=c.block_table.astype(np.int64)), "block_table.dtype"),
        (lambda c: dict(cache_seqlens=c.cache_seqlens.tolist()), "cache_seqlens"),
        (lambda c: dict(q=c.q.view(np.uint16)), "q.dtype"),  # raw bits without dtype=
        (lambda c: dict(head_dim_v="512"), "head_dim_v"),
        (lambda c: dict(dtype="int4"), "dtype"),
        (lambda c: dict(softmax_scale=float("nan")), "softmax_scale"),
    ],
)
def test_python_side_rejects_in_the_same_format(case, mutate, arg):
    # What the C ABI cannot even describe (int64, float64, lists) is rejected before the call, worded alike.
    msg = expect_library_error(lambda: call(case, **mutate(case)), arg)
    assert msg.startswith("flash_mla_with_kvcache: invalid argument "), msg


def test_metadata_errors():
    seqlens = np.array([10, 20], dtype=np.int32)
    expect_library_error(lambda: get_mla_metadata(seqlens.reshape(1, 2), 1, 1), "cache_seqlens.ndim")
    expect_library_error(lambda: get_mla_metadata(seqlens.astype(np.int64), 1, 1), "cache_seqlens.dtype")
    expect_library_error(lambda: get_mla_metadata(seqlens, 0, 1), "num_heads_per_head_k")
    expect_library_error(lambda: get_mla_metadata(seqlens, 16, 0), "num_heads_k")
    strided = np.array([10, 0, 20, 0], dtype=np.int32)[::2]
    expect_library_error(lambda: get_mla_metadata(strided, 16, 1), "cache_seqlens.strides")


def test_errors_leave_no_stale_message(case):
    with pytest.raises(ValueError):
        call(case, head_dim_v=576)
    out, _ = call(case)  # a later success is not affected
    assert out.dtype == ml_dtypes.bfloat16


def test_device_mismatch(case):
    # CPU run (numpy q) with arguments that claim to live on cuda:0: the library rejects them by device.
    nb, page, h_kv, d = case.k_cache.shape
    fake_k = FakeCudaTensor((nb, page, h_kv, d), code=4, bits=16)  # kDLBfloat
    msg = expect_library_error(lambda: call(case, k_cache=fake_k), "k_cache.device")
    assert msg.startswith(LIB) and "cuda:0" in msg, msg
    fake_lens = FakeCudaTensor(case.cache_seqlens.shape)
    expect_library_error(lambda: call(case, cache_seqlens=fake_lens), "cache_seqlens.device")


def test_concurrent_calls_from_threads(rng):
    # Handles are shared between threads and errors are per thread: run good and bad calls side by side.
    from concurrent.futures import ThreadPoolExecutor

    cases = [make_case(rng, "bf16", 2, 2, 8, 1, rng.integers(0, 300, 2), causal=True) for _ in range(6)]

    def good(c):
        meta, splits = get_mla_metadata(c.cache_seqlens, 16, 1)
        return flash_mla_with_kvcache(c.q, c.k_cache, c.block_table, c.cache_seqlens, D_V, meta, splits, causal=True)

    def bad(c):
        try:
            call(c, head_dim_v=576)
        except ValueError as e:
            return str(e)

    with ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(good, c) for c in cases]
        bads = [pool.submit(bad, c) for c in cases]
        for c, f in zip(cases, goods):
            out, lse = f.result()
            check_outputs(out, lse, c, ml_dtypes.bfloat16)
        for f in bads:
            assert "`head_dim_v`" in f.result()


def test_calls_do_not_leak_their_arguments(case):
    import sys

    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens)
    before = [sys.getrefcount(a) for a in args]
    for _ in range(5):
        call(case)
        with pytest.raises(ValueError):
            call(case, head_dim_v=1)
    assert [sys.getrefcount(a) for a in args] == before
