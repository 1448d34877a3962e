"""NumPy arrays on the CPU backend against the float64 reference (mla_reference.py)."""

import math

import ml_dtypes
import numpy as np
import pytest

import flashmla
from flashmla import flash_mla_with_kvcache, get_mla_metadata
from mla_reference import D_K, D_V, DTYPES, check_outputs, make_case, num_sm_parts, reference

OUT_DTYPE = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "e4m3": ml_dtypes.bfloat16}


def run(case, **kwargs):
    b, s_q, h_q, _ = case.q.shape
    h_kv = case.k_cache.shape[2]
    meta, splits = get_mla_metadata(case.cache_seqlens, s_q * h_q // h_kv, h_kv)
    return flash_mla_with_kvcache(
        case.q,
        case.k_cache,
        case.block_table,
        case.cache_seqlens,
        D_V,
        meta,
        splits,
        softmax_scale=case.softmax_scale,
        causal=case.causal,
        descale_q=case.descale_q,
        descale_k=case.descale_k,
        **kwargs,
    )


def random_seqlens(rng, b, s_q, max_len, zero_fraction=0.3):
    lens = rng.integers(1, max_len + 1, size=b)
    lens[rng.random(b) < zero_fraction] = 0
    return lens.astype(np.int32)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "e4m3"])
@pytest.mark.parametrize("s_q,causal", [(1, False), (1, True), (2, True), (2, False), (4, True)])
def test_random_shapes_match_reference(rng, dtype, s_q, causal):
    h_kv = int(rng.choice([1, 2]))
    h_q = h_kv * int(rng.choice([1, 3, 8, 16]))
    b = int(rng.integers(1, 5))
    page = int(rng.choice([64, 64, 16]))
    case = make_case(rng, dtype, b, s_q, h_q, h_kv, random_seqlens(rng, b, s_q, 300), page=page, causal=causal)
    out, lse = run(case)
    check_outputs(out, lse, case, OUT_DTYPE[dtype])


@pytest.mark.parametrize("dtype", ["bf16", "e4m3"])
def test_long_sequences_are_split_and_combined(rng, dtype):
    # One long request and a few short ones: with more than one part, the long one is cut into several splits,
    # so the float32 partials and the log-sum-exp combine are exercised.
    seqlens = np.array([2000, 7, 0, 130], dtype=np.int32)
    case = make_case(rng, dtype, 4, 2, 16, 1, seqlens, causal=True)
    meta, splits = get_mla_metadata(case.cache_seqlens, 2 * 16, 1)
    parts = meta.shape[0]
    if parts > 1:
        assert splits[1] - splits[0] > 1, f"request 0 not split over {parts} parts: num_splits={splits}"
    out, lse = flash_mla_with_kvcache(
        case.q, case.k_cache, case.block_table, case.cache_seqlens, D_V, meta, splits,
        causal=True, descale_q=case.descale_q, descale_k=case.descale_k,
    )  # fmt: skip
    check_outputs(out, lse, case, OUT_DTYPE[dtype])


def test_all_zero_lengths_give_zero_out_and_inf_lse(rng):
    case = make_case(rng, "bf16", 3, 2, 4, 1, [0, 0, 0], causal=True)
    out, lse = run(case)
    assert (out.astype(np.float32) == 0).all()
    assert np.isposinf(lse).all()
    check_outputs(out, lse, case, ml_dtypes.bfloat16)


def test_causal_rows_without_keys(rng):
    # s_k < s_q: the first s_q - s_k tokens see nothing (out 0, lse +inf); the others see a prefix.
    case = make_case(rng, "bf16", 2, 4, 2, 1, [2, 5], causal=True)
    out, lse = run(case)
    assert np.isposinf(lse[0, :, :2]).all() and np.isfinite(lse[0, :, 2:]).all()
    assert (out[0, :2].astype(np.float32) == 0).all()
    check_outputs(out, lse, case, ml_dtypes.bfloat16)


def test_explicit_softmax_scale(rng):
    case = make_case(rng, "bf16", 2, 1, 8, 1, [100, 33], softmax_scale=0.11)
    out, lse = run(case)
    check_outputs(out, lse, case, ml_dtypes.bfloat16)
    case.softmax_scale = None
    _, lse_default = run(case)
    assert not np.allclose(lse, lse_default), "softmax_scale was ignored"


def test_default_scale_is_upstreams(rng):
    case = make_case(rng, "bf16", 2, 2, 4, 1, [70, 9], causal=True)
    out_default, lse_default = run(case)
    case.softmax_scale = D_K**-0.5
    out_explicit, lse_explicit = run(case)
    np.testing.assert_array_equal(out_default.view(np.uint16), out_explicit.view(np.uint16))
    np.testing.assert_array_equal(lse_default, lse_explicit)


def test_metadata_shapes_and_prefix_sums(rng):
    seqlens = np.array([1000, 64, 0, 3000, 130], dtype=np.int32)
    for s_q, h_q, h_kv in [(1, 16, 1), (2, 128, 1), (1, 64, 2)]:
        meta, splits = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
        sm = flashmla.backend_info("cpu")["sm_count"]
        assert isinstance(meta, np.ndarray) and isinstance(splits, np.ndarray)
        assert meta.dtype == np.int32 and splits.dtype == np.int32
        assert meta.shape == (num_sm_parts(sm, s_q * h_q // h_kv, h_kv), 8)
        assert splits.shape == (len(seqlens) + 1,)
        assert splits[0] == 0 and (np.diff(splits) >= 1).all()
        assert splits[-1] <= len(seqlens) + meta.shape[0] - 1


def test_metadata_is_reused_across_layers(rng):
    # One metadata, several layers with different caches and queries (upstream's usage).
    seqlens = np.array([90, 200, 1], dtype=np.int32)
    layers = [make_case(rng, "bf16", 3, 2, 16, 1, seqlens, causal=True) for _ in range(3)]
    meta, splits = get_mla_metadata(seqlens, 2 * 16, 1)
    for case in layers:
        out, lse = flash_mla_with_kvcache(
            case.q, case.k_cache, case.block_table, seqlens, D_V, meta, splits, causal=True
        )
        check_outputs(out, lse, case, ml_dtypes.bfloat16)


def test_deterministic(rng):
    case = make_case(rng, "bf16", 3, 2, 16, 1, [500, 3, 260], causal=True)
    a_out, a_lse = run(case)
    b_out, b_lse = run(case)
    np.testing.assert_array_equal(a_out.view(np.uint16), b_out.view(np.uint16))
    np.testing.assert_array_equal(a_lse, b_lse)


def test_strided_views_are_read_in_place(rng):
    # q strided over tokens, k_cache a view into a larger buffer (every other page, one of two KV-head slots),
    # block_table with a padded row stride: only the last dimensions are contiguous.
    case = make_case(rng, "bf16", 3, 2, 8, 1, [150, 0, 64], causal=True)
    b, s_q, h_q, d = case.q.shape
    q_big = np.zeros((b, s_q * 2, h_q, d), dtype=case.q.dtype)
    q_big[:, ::2] = case.q
    q_view = q_big[:, ::2]
    nb, page, h_kv, _ = case.k_cache.shape
    k_big = np.full((nb * 2, page, 2, d), np.nan, dtype=case.k_cache.dtype)
    k_big[::2, :, 1:2] = case.k_cache
    k_view = k_big[::2, :, 1:2]
    bt_big = np.full((b, case.block_table.shape[1] + 5), -1, dtype=np.int32)
    bt_big[:, : case.block_table.shape[1]] = case.block_table
    bt_view = bt_big[:, : case.block_table.shape[1]]
    assert not q_view.flags.c_contiguous and not k_view.flags.c_contiguous and not bt_view.flags.c_contiguous
    meta, splits = get_mla_metadata(case.cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q_view, k_view, bt_view, case.cache_seqlens, D_V, meta, splits, causal=True)
    check_outputs(out, lse, case, ml_dtypes.bfloat16)


def test_read_only_inputs(rng):
    case = make_case(rng, "bf16", 2, 1, 4, 1, [40, 100])
    for a in (case.q, case.k_cache, case.block_table, case.cache_seqlens):
        a.setflags(write=False)
    out, lse = run(case)
    check_outputs(out, lse, case, ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "e4m3"])
def test_raw_bit_arrays_with_dtype_hint(rng, dtype):
    # NumPy without ml_dtypes: uint16 / uint8 raw bits plus dtype=; the same bits as the typed path.
    case = make_case(rng, dtype, 2, 2, 4, 1, [77, 5], causal=True)
    typed_out, typed_lse = run(case)
    bits_type = np.uint8 if dtype == "e4m3" else np.uint16
    case.q = case.q.view(bits_type)
    case.k_cache = case.k_cache.view(bits_type)
    out, lse = run(case, dtype=dtype)
    want = np.float16 if dtype == "fp16" else np.uint16
    assert out.dtype == want
    np.testing.assert_array_equal(out.view(np.uint16), typed_out.view(np.uint16))
    np.testing.assert_array_equal(lse, typed_lse)


def test_raw_bits_round_trip_through_helpers(rng):
    # The documented NumPy-only workflow: float32 -> bits -> decode -> float32.
    from flashmla import bits

    case = make_case(rng, "bf16", 2, 1, 4, 1, [50, 120])
    q_bits = bits.float32_to_bf16(case.q.astype(np.float32))
    k_bits = bits.float32_to_bf16(case.k_cache.astype(np.float32))
    meta, splits = get_mla_metadata(case.cache_seqlens, 4, 1)
    out_bits, lse = flash_mla_with_kvcache(
        q_bits, k_bits, case.block_table, case.cache_seqlens, D_V, meta, splits, dtype="bf16"
    )
    check_outputs(bits.bf16_to_float32(out_bits).astype(ml_dtypes.bfloat16), lse, case, ml_dtypes.bfloat16)


def test_other_dlpack_producers_as_inputs(rng):
    # Arguments other than q only need __dlpack__: wrap them in a minimal producer object.
    class Producer:
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, stream=None):
            return self.a.__dlpack__()

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    case = make_case(rng, "fp16", 2, 1, 4, 1, [33, 70])
    meta, splits = get_mla_metadata(case.cache_seqlens, 4, 1)
    out, lse = flash_mla_with_kvcache(
        case.q, Producer(case.k_cache), Producer(case.block_table), Producer(case.cache_seqlens), D_V,
        Producer(meta), Producer(splits),
    )  # fmt: skip
    check_outputs(out, lse, case, np.float16)


def test_reference_self_check():
    # The reference itself on a hand-computable case: one key -> out = V row, lse = scale * q.k.
    q = np.zeros((1, 1, 1, D_K))
    q[..., 0] = 2.0
    k = np.zeros((1, 64, 1, D_K))
    k[0, 0, 0, 0] = 3.0
    k[0, 0, 0, 1] = 5.0
    out, lse = reference(q, k, np.array([[0]]), np.array([1]))
    assert out[0, 0, 0, 1] == 5.0 and out[0, 0, 0, 0] == 3.0
    assert math.isclose(lse[0, 0, 0], 6.0 / math.sqrt(D_K))
    # Two equal keys: the same output, lse + ln 2.
    k[0, 1] = k[0, 0]
    out2, lse2 = reference(q, k, np.array([[0]]), np.array([2]))
    np.testing.assert_allclose(out2, out)
    assert math.isclose(lse2[0, 0, 0], lse[0, 0, 0] + math.log(2))
    assert set(DTYPES) == {"bf16", "fp16", "e4m3"}


@pytest.mark.parametrize("h_q,h_kv", [(1, 1), (9, 3), (63, 1), (126, 2), (8, 8)])
def test_upstream_head_grid(rng, h_q, h_kv):
    # Head counts of upstream's correctness grid: partial 64-row tiles, several KV heads, one head per KV head.
    case = make_case(rng, "bf16", 3, 2, h_q, h_kv, [140, 0, 20], causal=True)
    out, lse = run(case)
    check_outputs(out, lse, case, ml_dtypes.bfloat16)


def test_upstream_head_schedule(rng):
    # get_mla_metadata() without arguments: an empty schedule that the first decode call fills.
    case = make_case(rng, "bf16", 3, 2, 16, 1, [900, 1, 0], causal=True)
    meta, splits = get_mla_metadata(case.cache_seqlens, 32, 1)
    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens, D_V)
    ref_out, ref_lse = flash_mla_with_kvcache(*args, meta, splits, causal=True)
    sched, none = get_mla_metadata()
    assert none is None and not sched.have_initialized and sched.tile_scheduler_metadata is None
    for _ in range(3):
        out, lse = flash_mla_with_kvcache(*args, sched, None, causal=True)
        assert np.array_equal(out.view(np.uint16), ref_out.view(np.uint16)) and np.array_equal(lse, ref_lse)
    assert sched.have_initialized and np.array_equal(sched.tile_scheduler_metadata, meta)
    assert sched.config["b"] == "3" and sched.config["causal"] == "true"
    with pytest.raises(ValueError, match="tile_scheduler_metadata.config.causal"):
        flash_mla_with_kvcache(*args, sched, None, causal=False)
    with pytest.raises(ValueError, match="num_splits"):
        flash_mla_with_kvcache(*args, sched, splits, causal=True)
    with pytest.raises(ValueError, match="num_splits"):
        flash_mla_with_kvcache(*args, meta, None, causal=True)
