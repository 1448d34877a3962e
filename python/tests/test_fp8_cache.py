"""`flash_mla_with_kvcache(..., is_fp8_kvcache=True)` on the CPU: sparse (indices, topk_length, attn_sink, an extra
cache) and dense decode over DeepSeek V3.2's FP8 cache (656 bytes per token), against a float64 reference written
here from the layout and the math of docs/sparse-fp8.md (quantiser included), not from the library."""
import math

import numpy as np
import pytest

import flashmla
from mla_reference import assert_close

ml_dtypes = pytest.importorskip("ml_dtypes")

D_QK, D_V, D_NOPE, TILE, TOKEN_BYTES = 576, 512, 512, 128, 656
SCALES_AT, ROPE_AT = 512, 528


def quantize_v32(values: np.ndarray) -> np.ndarray:
    """[blocks, page, 1, 576] float32 → [blocks, page, 1, 656] uint8: per 128-column tile a power-of-two float32
    scale 2^ceil(log2(max(amax / 448, 1e-4))), E4M3 codes of x / scale, then the 64 RoPE columns as bfloat16."""
    blocks, page = values.shape[:2]
    rows = values.reshape(-1, D_QK).astype(np.float32)
    out = np.zeros((rows.shape[0], TOKEN_BYTES), np.uint8)
    nope = rows[:, :D_NOPE].reshape(-1, D_NOPE // TILE, TILE)
    amax = np.abs(nope).max(axis=2)
    scales = np.exp2(np.ceil(np.log2(np.maximum(amax / np.float32(448), np.float32(1e-4))))).astype(np.float32)
    codes = (nope / scales[:, :, None]).astype(ml_dtypes.float8_e4m3fn)
    out[:, :D_NOPE] = codes.reshape(-1, D_NOPE).view(np.uint8)
    out[:, SCALES_AT:ROPE_AT] = scales.astype("<f4").view(np.uint8)
    out[:, ROPE_AT:] = rows[:, D_NOPE:].astype(ml_dtypes.bfloat16).view(np.uint8)
    return out.reshape(blocks, page, 1, TOKEN_BYTES)


def dequantize_v32(cache: np.ndarray) -> np.ndarray:
    """[blocks, page, 1, 656] uint8 → [blocks · page, 576] float64: bf16(e4m3 · scale) for NoPE, bf16 RoPE."""
    rows = cache.reshape(-1, TOKEN_BYTES)
    codes = rows[:, :D_NOPE].copy().view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(-1, D_NOPE // TILE, TILE)
    scales = rows[:, SCALES_AT:ROPE_AT].copy().view("<f4")
    nope = (codes * scales[:, :, None]).reshape(-1, D_NOPE).astype(ml_dtypes.bfloat16).astype(np.float64)
    rope = rows[:, ROPE_AT:].copy().view(ml_dtypes.bfloat16).astype(np.float64)
    return np.concatenate([nope, rope], axis=1)


def reference(q, rows_of, softmax_scale=None, attn_sink=None):
    """float64 (out, lse) for q [b, s_q, h_q, 576] where rows_of(i, t) gives the K rows ([n, 576] float64) that
    request i's query token t attends to."""
    b, s_q, h_q, _ = q.shape
    scale = D_QK**-0.5 if softmax_scale is None else softmax_scale
    out = np.zeros((b, s_q, h_q, D_V))
    lse = np.full((b, h_q, s_q), np.inf)
    qf = q.astype(np.float64)
    for i in range(b):
        for t in range(s_q):
            k = rows_of(i, t)
            if len(k) == 0:
                continue
            s = qf[i, t] @ k.T * scale  # [h_q, n]
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            denom = p.sum(axis=1, keepdims=True)
            l = (m + np.log(denom))[:, 0]
            o = (p / denom) @ k[:, :D_V]
            if attn_sink is not None:
                o = o / (1.0 + np.exp(attn_sink.astype(np.float64) - l))[:, None]
            out[i, t], lse[i, :, t] = o, l
    return out, lse


def check(out, lse, ref_out, ref_lse):
    out = np.asarray(out)
    ref = ref_out.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    assert out.dtype == ml_dtypes.bfloat16 and np.asarray(lse).dtype == np.float32
    assert_close("out", out.astype(np.float64), ref, abs_tol=8e-4, rel_tol=2.01 / 128, cos_tol=5e-6)
    assert_close("lse", np.asarray(lse).astype(np.float64), ref_lse, abs_tol=1e-6, rel_tol=8.01 / 65536, cos_tol=1e-7)


def make(rng, b=2, s_q=2, h_q=16, blocks=6, page=64, amp=1.0):
    q = (rng.standard_normal((b, s_q, h_q, D_QK)) * amp).astype(ml_dtypes.bfloat16)
    values = (rng.standard_normal((blocks, page, 1, D_QK)) * amp).astype(np.float32)
    cache = quantize_v32(values)
    return q, cache, dequantize_v32(cache)


def test_quantiser_here_matches_the_documented_worked_example():
    # docs/sparse-fp8.md: token n has every NoPE column [1.0, 0.5, -1.0, 2.0][n]; token 0 is codes 0x78 and
    # scales 2^-8 (bytes 00 00 80 3B), token 2 codes 0xF8, token 3 codes 0x78 with scale 2^-7 (00 00 00 3C).
    values = np.zeros((2, 2, 1, D_QK), np.float32)
    for n, v in enumerate([1.0, 0.5, -1.0, 2.0]):
        values[n // 2, n % 2, 0, :D_NOPE] = v
    cache = quantize_v32(values).reshape(4, TOKEN_BYTES)
    assert (cache[0, :D_NOPE] == 0x78).all() and bytes(cache[0, SCALES_AT:SCALES_AT + 4]) == b"\x00\x00\x80\x3b"
    assert (cache[2, :D_NOPE] == 0xF8).all()
    assert (cache[3, :D_NOPE] == 0x78).all() and bytes(cache[3, SCALES_AT:SCALES_AT + 4]) == b"\x00\x00\x00\x3c"
    assert np.array_equal(dequantize_v32(cache.reshape(2, 2, 1, TOKEN_BYTES))[:, 0], [1.0, 0.5, -1.0, 2.0])


@pytest.mark.parametrize("amp", [1.0, 3.0])
def test_sparse_decode_matches_reference(rng, amp):
    b, s_q, h_q, topk = 3, 2, 16, 40
    q, cache, rows = make(rng, b=b, s_q=s_q, h_q=h_q, amp=amp)
    n = rows.shape[0]
    indices = rng.integers(0, n, size=(b, s_q, topk)).astype(np.int32)
    indices[0, 0, 5:9] = -1  # skipped
    indices[1, 1, 3] = n + 7  # past the cache: skipped
    indices[2, 0, :] = -1  # nothing to attend to: out 0, lse +inf
    topk_length = np.array([topk, 17, topk], np.int32)  # request 1 reads only its first 17 entries
    sink = rng.standard_normal(h_q).astype(np.float32)

    def rows_of(table):
        def rows(i, t):
            sel = indices[i, t, : topk_length[i]]
            return table[sel[(sel >= 0) & (sel < n)]]

        return rows

    sched, _ = flashmla.get_mla_metadata()
    out, lse = flashmla.flash_mla_with_kvcache(
        q, cache, None, None, D_V, sched, None, is_fp8_kvcache=True, indices=indices, topk_length=topk_length,
        attn_sink=sink,
    )
    ref_out, ref_lse = reference(q, rows_of(rows), attn_sink=sink)
    check(out, lse, ref_out, ref_lse)
    assert (np.asarray(out)[2, 0].astype(np.float32) == 0).all() and np.isinf(np.asarray(lse)[2, :, 0]).all()
    assert sched.have_initialized and sched.config["is_fp8_kvcache"] == "true" and sched.config["topk"] == str(topk)

    # The filled schedule serves the next layer: same shapes and lengths, another cache.
    q2, cache2, rows2 = make(rng, b=b, s_q=s_q, h_q=h_q, amp=amp)
    out2, lse2 = flashmla.flash_mla_with_kvcache(
        q2, cache2, None, None, D_V, sched, None, is_fp8_kvcache=True, indices=indices, topk_length=topk_length,
        attn_sink=sink,
    )
    ref_out2, ref_lse2 = reference(q2, rows_of(rows2), attn_sink=sink)
    check(out2, lse2, ref_out2, ref_lse2)


def test_sparse_decode_with_an_extra_cache(rng):
    b, s_q, h_q, topk, extra_topk = 2, 1, 64, 24, 12
    q, cache, rows = make(rng, b=b, s_q=s_q, h_q=h_q, blocks=4)
    _, extra, extra_rows = make(rng, b=b, s_q=s_q, h_q=h_q, blocks=3, page=64)
    indices = rng.integers(0, rows.shape[0], size=(b, s_q, topk)).astype(np.int32)
    extra_indices = rng.integers(0, extra_rows.shape[0], size=(b, s_q, extra_topk)).astype(np.int32)
    extra_len = np.array([extra_topk, 5], np.int32)
    sched, _ = flashmla.get_mla_metadata()
    out, lse = flashmla.flash_mla_with_kvcache(
        q, cache, None, None, D_V, sched, None, softmax_scale=0.05, is_fp8_kvcache=True, indices=indices,
        extra_k_cache=extra, extra_indices_in_kvcache=extra_indices, extra_topk_length=extra_len,
    )
    ref_out, ref_lse = reference(
        q,
        lambda i, t: np.concatenate([rows[indices[i, t]], extra_rows[extra_indices[i, t, : extra_len[i]]]]),
        softmax_scale=0.05,
    )
    check(out, lse, ref_out, ref_lse)


def test_dense_decode_over_the_fp8_cache(rng):
    b, s_q, h_q, page = 2, 2, 16, 64
    q, cache, rows = make(rng, b=b, s_q=s_q, h_q=h_q, blocks=5, page=page)
    block_table = np.array([[3, 0, 4], [1, 2, 2147480000]], np.int32)
    seqlens = np.array([150, 100], np.int32)
    sched, _ = flashmla.get_mla_metadata()
    out, lse = flashmla.flash_mla_with_kvcache(
        q, cache, block_table, seqlens, D_V, sched, None, causal=True, is_fp8_kvcache=True
    )

    def rows_of(i, t):
        visible = seqlens[i] - s_q + t + 1  # bottom-right aligned causal mask
        tokens = np.arange(max(visible, 0))
        return rows[block_table[i, tokens // page] * page + tokens % page]

    ref_out, ref_lse = reference(q, rows_of)
    check(out, lse, ref_out, ref_lse)


def test_bad_calls_name_the_argument(rng):
    q, cache, _ = make(rng, b=1, s_q=1, h_q=16, blocks=2)
    indices = np.zeros((1, 1, 8), np.int32)
    LIB = "flash_mla_with_kvcache: invalid argument "
    sched, _ = flashmla.get_mla_metadata()
    # Sparse arguments without an FP8 cache.
    with pytest.raises(ValueError, match=LIB + "`indices`"):
        flashmla.flash_mla_with_kvcache(q, cache, None, None, D_V, sched, None, indices=indices)
    # The 2025 schedule cannot describe a selection.
    meta, splits = flashmla.get_mla_metadata(np.array([8], np.int32), 16, 1)
    with pytest.raises(ValueError, match=LIB + "`tile_scheduler_metadata`: expected a FlashMLASchedMeta"):
        flashmla.flash_mla_with_kvcache(q, cache, None, None, D_V, meta, splits, is_fp8_kvcache=True, indices=indices)
    # Descales belong to dense float8_e4m3fn q and k_cache.
    with pytest.raises(ValueError, match=LIB + "`descale_q`"):
        flashmla.flash_mla_with_kvcache(
            q, cache, None, None, D_V, sched, None, descale_q=np.ones(1, np.float32), is_fp8_kvcache=True,
            indices=indices,
        )
    # A cache whose rows are not one of the two layouts.
    with pytest.raises(ValueError, match=LIB + "`k_cache"):
        flashmla.flash_mla_with_kvcache(
            q, cache[..., :600].copy(), None, None, D_V, sched, None, is_fp8_kvcache=True, indices=indices
        )
    # A schedule filled for one selection width is not reused for another.
    flashmla.flash_mla_with_kvcache(q, cache, None, None, D_V, sched, None, is_fp8_kvcache=True, indices=indices)
    with pytest.raises(ValueError, match=LIB + r"`tile_scheduler_metadata.config.topk`: expected 8 .*got 4"):
        flashmla.flash_mla_with_kvcache(
            q, cache, None, None, D_V, sched, None, is_fp8_kvcache=True, indices=indices[..., :4].copy()
        )


def test_torch_cpu_tensors(rng):
    torch = pytest.importorskip("torch")
    b, s_q, h_q, topk = 2, 1, 16, 32
    q, cache, rows = make(rng, b=b, s_q=s_q, h_q=h_q)
    indices = rng.integers(0, rows.shape[0], size=(b, s_q, topk)).astype(np.int32)
    qt = torch.from_numpy(q.view(np.int16)).view(torch.bfloat16)
    sched, _ = flashmla.get_mla_metadata()
    out, lse = flashmla.flash_mla_with_kvcache(
        qt, torch.from_numpy(cache), None, None, D_V, sched, None, is_fp8_kvcache=True,
        indices=torch.from_numpy(indices),
    )
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = reference(q, lambda i, t: rows[indices[i, t]])
    check(out.view(torch.int16).numpy().view(ml_dtypes.bfloat16), lse.numpy(), ref_out, ref_lse)


def test_cuda_says_the_fp8_cache_kernel_is_missing(rng):
    """Until the Hopper kernel exists, CUDA tensors get UnsupportedError naming the gap, and backend_info says so."""
    from conftest import require_gpu

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        if require_gpu():
            pytest.fail("FLASHMLA_REQUIRE_GPU=1 but torch.cuda.is_available() is False")
        pytest.skip("no CUDA device")
    info = flashmla.backend_info("cuda")
    if info["backend"] == "hopper":
        assert info["fp8_cache"] == {"sparse": {}, "dense": []}
    q, cache, rows = make(rng, b=1, s_q=1, h_q=64)
    qt = torch.from_numpy(q.view(np.int16)).view(torch.bfloat16).cuda()
    indices = torch.zeros((1, 1, 8), dtype=torch.int32, device="cuda")
    sched, _ = flashmla.get_mla_metadata()
    with pytest.raises(flashmla.UnsupportedError, match="flash_mla_with_kvcache: "):
        flashmla.flash_mla_with_kvcache(
            qt, torch.from_numpy(cache).cuda(), None, None, D_V, sched, None, is_fp8_kvcache=True, indices=indices
        )


def test_torch_op_and_torch_compile(rng):
    """torch.ops.flashmla.flash_mla_with_fp8_kvcache: the plain function's results, fake tensors that agree
    (opcheck), and a fullgraph torch.compile of a call."""
    torch = pytest.importorskip("torch")
    import flashmla.ops  # noqa: F401  (registers torch.ops.flashmla.*)

    b, s_q, h_q, topk = 2, 1, 16, 24
    q, cache, rows = make(rng, b=b, s_q=s_q, h_q=h_q)
    indices = rng.integers(-1, rows.shape[0], size=(b, s_q, topk)).astype(np.int32)
    qt = torch.from_numpy(q.view(np.int16)).view(torch.bfloat16)
    kt, it = torch.from_numpy(cache), torch.from_numpy(indices)
    sink = torch.from_numpy(rng.standard_normal(h_q).astype(np.float32))
    sched, _ = flashmla.get_mla_metadata()
    want = flashmla.flash_mla_with_kvcache(
        qt, kt, None, None, D_V, sched, None, is_fp8_kvcache=True, indices=it, attn_sink=sink
    )
    op = torch.ops.flashmla.flash_mla_with_fp8_kvcache
    got = op(qt, kt, None, None, D_V, indices=it, attn_sink=sink)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.int16) if g.dtype == torch.bfloat16 else g,
                           w.view(torch.int16) if w.dtype == torch.bfloat16 else w)
    torch.library.opcheck(
        op.default, (qt, kt, None, None, D_V), {"indices": it, "attn_sink": sink}, test_utils=("test_faketensor",)
    )
    step = torch.compile(lambda q, k, i: op(q, k, None, None, D_V, indices=i), fullgraph=True, backend="eager")
    out, lse = step(qt, kt, it)
    ref_out, ref_lse = reference(q, lambda i, t: rows[indices[i, t][indices[i, t] >= 0]])
    check(out.view(torch.int16).numpy().view(ml_dtypes.bfloat16), lse.numpy(), ref_out, ref_lse)
