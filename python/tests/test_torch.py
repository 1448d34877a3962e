"""torch.Tensor inputs: CPU tensors on the CPU backend, CUDA tensors on the Hopper backend (PyTorch's current
stream, outputs from its caching allocator), and torch.cuda.graph capture + replay of metadata + decode.

Skipped without PyTorch, and the CUDA cases without a GPU; FLASHMLA_REQUIRE_GPU=1 (the GPU workflow of
docs/python.md) turns both skips into failures.
"""

import ml_dtypes
import numpy as np
import pytest

from conftest import require_gpu
from mla_reference import D_V, check_outputs, make_case

try:
    import torch
except ImportError:
    if require_gpu():
        raise
    pytest.skip("PyTorch is not installed", allow_module_level=True)

import flashmla
from flashmla import flash_mla_with_kvcache, get_mla_metadata

OUT_DTYPE = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "e4m3": ml_dtypes.bfloat16}


def cuda_or_skip():
    if not torch.cuda.is_available():
        if require_gpu():
            pytest.fail("FLASHMLA_REQUIRE_GPU=1 but torch.cuda.is_available() is False")
        pytest.skip("no CUDA device")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        cuda_or_skip()
        return torch.device("cuda", torch.cuda.current_device())  # with its index, as tensors report it
    return torch.device("cpu")


def to_torch(a, device):
    """A NumPy array (ml_dtypes included) as a tensor of the matching torch dtype on `device` (exact bits)."""
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    elif a.dtype == ml_dtypes.float8_e4m3fn:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(torch.float8_e4m3fn)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device)


def to_numpy(t):
    """A tensor back to NumPy with the matching (ml_dtypes) dtype, exact bits."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_case(case, device):
    args = [to_torch(x, device) for x in (case.q, case.k_cache, case.block_table, case.cache_seqlens)]
    dq = None if case.descale_q is None else to_torch(case.descale_q, device)
    dk = None if case.descale_k is None else to_torch(case.descale_k, device)
    return args, dq, dk


def decode(case, device):
    (q, k, bt, sl), dq, dk = torch_case(case, device)
    b, s_q, h_q, _ = q.shape
    h_kv = k.shape[2]
    meta, splits = get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
    assert meta.device == device and splits.device == device
    assert meta.dtype == torch.int32 and splits.dtype == torch.int32
    out, lse = flash_mla_with_kvcache(
        q, k, bt, sl, D_V, meta, splits, softmax_scale=case.softmax_scale, causal=case.causal,
        descale_q=dq, descale_k=dk,
    )  # fmt: skip
    assert out.device == device and lse.device == device
    return out, lse


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "e4m3"])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True), (4, True)])
def test_matches_reference(rng, device, dtype, s_q, causal):
    h_kv = int(rng.choice([1, 2]))
    h_q = h_kv * int(rng.choice([1, 8, 16, 64]))
    b = int(rng.integers(1, 6))
    seqlens = rng.integers(1, 400, size=b)
    seqlens[rng.random(b) < 0.3] = 0
    case = make_case(rng, dtype, b, s_q, h_q, h_kv, seqlens, causal=causal)
    out, lse = decode(case, device)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16, "e4m3": torch.bfloat16}[dtype]
    assert out.dtype == want and lse.dtype == torch.float32
    check_outputs(to_numpy(out), to_numpy(lse), case, OUT_DTYPE[dtype], fp8_kernel=dtype == "e4m3" and q_is_cuda(out))


def q_is_cuda(t):
    return t.device.type == "cuda"


def test_upstream_benchmark_shape(rng, device):
    # DeepSeek decode without TP: h_q = 128, MTP s_q = 2, long varied lengths, zero-length requests included.
    seqlens = rng.integers(500, 3000, size=8)
    seqlens[[2, 5]] = 0
    case = make_case(rng, "bf16", 8, 2, 128, 1, seqlens, causal=True)
    out, lse = decode(case, device)
    check_outputs(to_numpy(out), to_numpy(lse), case, ml_dtypes.bfloat16)


@pytest.mark.parametrize("h_q,h_kv", [(1, 1), (9, 3), (63, 1), (126, 2), (8, 8)])
def test_upstream_head_grid(rng, device, h_q, h_kv):
    # Head counts of upstream's correctness grid: partial 64-row tiles, several KV heads, one head per KV head.
    case = make_case(rng, "bf16", 3, 2, h_q, h_kv, [140, 0, 4096], causal=True)
    out, lse = decode(case, device)
    check_outputs(to_numpy(out), to_numpy(lse), case, ml_dtypes.bfloat16)


def test_requires_grad_inputs(rng, device):
    case = make_case(rng, "bf16", 2, 1, 8, 1, [65, 3])
    (q, k, bt, sl), _, _ = torch_case(case, device)
    q.requires_grad_(True)
    meta, splits = get_mla_metadata(sl, 8, 1)
    out, lse = flash_mla_with_kvcache(q, k, bt, sl, D_V, meta, splits)
    check_outputs(to_numpy(out), to_numpy(lse), case, ml_dtypes.bfloat16)


def test_argument_errors_carry_the_library_message(rng, device):
    case = make_case(rng, "bf16", 2, 1, 8, 1, [65, 3])
    (q, k, bt, sl), _, _ = torch_case(case, device)
    meta, splits = get_mla_metadata(sl, 8, 1)
    with pytest.raises(ValueError, match=r"`q\.dtype`"):
        flash_mla_with_kvcache(q.float(), k, bt, sl, D_V, meta, splits)
    with pytest.raises(ValueError, match=r"`k_cache\.dtype`"):
        flash_mla_with_kvcache(q, k.half(), bt, sl, D_V, meta, splits)
    with pytest.raises(ValueError, match=r"`block_table\.dtype`"):
        flash_mla_with_kvcache(q, k, bt.long(), sl, D_V, meta, splits)
    with pytest.raises(ValueError, match=r"`head_dim_v`"):
        flash_mla_with_kvcache(q, k, bt, sl, 576, meta, splits)


def test_cuda_device_mismatch():
    cuda_or_skip()
    rng = np.random.default_rng(7)
    case = make_case(rng, "bf16", 2, 1, 8, 1, [65, 3])
    (q, k, bt, sl), _, _ = torch_case(case, torch.device("cuda"))
    meta, splits = get_mla_metadata(sl, 8, 1)
    with pytest.raises(ValueError, match=r"`k_cache\.device`") as e:
        flash_mla_with_kvcache(q, k.cpu(), bt, sl, D_V, meta, splits)
    assert str(e.value).startswith("flash_mla_with_kvcache: invalid argument")
    with pytest.raises(ValueError, match=r"`tile_scheduler_metadata\.device`"):
        flash_mla_with_kvcache(q, k, bt, sl, D_V, meta.cpu(), splits)
    with pytest.raises(ValueError, match=r"`num_splits\.device`"):
        flash_mla_with_kvcache(q, k, bt, sl, D_V, meta, splits.cpu())


def test_cuda_runs_on_the_current_stream():
    cuda_or_skip()
    rng = np.random.default_rng(11)
    case = make_case(rng, "bf16", 4, 2, 64, 1, [900, 0, 33, 2000], causal=True)
    (q, k, bt, sl), _, _ = torch_case(case, torch.device("cuda"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # Slow work queued ahead on the same stream: if the library used another stream, it would read q before
        # this in-place update and the result would be wrong.
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):
            big = big @ big / 64
        q_mod = q * 1
        q_mod.mul_(2.0).div_(2.0)  # same values, produced on `side` just before the decode
        meta, splits = get_mla_metadata(sl, 2 * 64, 1)
        out, lse = flash_mla_with_kvcache(q_mod, k, bt, sl, D_V, meta, splits, causal=True)
    side.synchronize()
    check_outputs(to_numpy(out), to_numpy(lse), case, ml_dtypes.bfloat16)


def test_cuda_graph_capture_and_replay():
    cuda_or_skip()
    rng = np.random.default_rng(3)
    b, s_q, h_q, h_kv, num_blocks, max_pages = 6, 2, 16, 1, 40, 6
    first = make_case(rng, "bf16", b, s_q, h_q, h_kv, [300, 0, 64, 65, 1, 380], causal=True,
                      num_blocks=num_blocks, max_pages=max_pages)  # fmt: skip
    dev = torch.device("cuda")
    (q, k, bt, sl), _, _ = torch_case(first, dev)

    # Warm up on a side stream (opens the backend, loads kernels), as PyTorch's graph docs recommend.
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        meta, splits = get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
        flash_mla_with_kvcache(q, k, bt, sl, D_V, meta, splits, causal=True)
    torch.cuda.current_stream().wait_stream(warm)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta, splits = get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
        out, lse = flash_mla_with_kvcache(q, k, bt, sl, D_V, meta, splits, causal=True)

    cases = [first] + [
        make_case(rng, "bf16", b, s_q, h_q, h_kv, lens, causal=True, num_blocks=num_blocks, max_pages=max_pages)
        for lens in ([5, 380, 0, 0, 129, 64], [0, 0, 0, 0, 0, 0], [384, 384, 1, 2, 3, 100])
    ]
    for case in cases:
        (q2, k2, bt2, sl2), _, _ = torch_case(case, dev)
        q.copy_(q2)
        k.copy_(k2)
        bt.copy_(bt2)
        sl.copy_(sl2)
        graph.replay()
        torch.cuda.synchronize()
        check_outputs(to_numpy(out), to_numpy(lse), case, ml_dtypes.bfloat16)
        splits_now = to_numpy(splits)
        assert splits_now[0] == 0 and (np.diff(splits_now) >= 1).all()


def test_second_gpu_uses_its_own_backend():
    cuda_or_skip()
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device")
    rng = np.random.default_rng(5)
    case = make_case(rng, "bf16", 2, 1, 16, 1, [100, 7])
    out, lse = decode(case, torch.device("cuda:1"))
    check_outputs(to_numpy(out), to_numpy(lse), case, ml_dtypes.bfloat16)


def test_hopper_backend_info():
    cuda_or_skip()
    info = flashmla.backend_info(torch.device("cuda", 0))
    assert info["backend"] == "hopper"
    assert info["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count


# ---------------------------------------------------------------------------------------------------------------
# upstream HEAD's calling convention, torch.library ops and torch.compile


def test_head_schedule_fills_on_first_call_and_matches(rng, device):
    case = make_case(rng, "bf16", 3, 2, 16, 1, [700, 64, 0], causal=True)
    (q, k, bt, sl), _, _ = torch_case(case, device)
    ref_out, ref_lse = decode(case, device)
    sched, none = get_mla_metadata()
    assert none is None and not sched.have_initialized
    for _ in range(2):  # the second call reuses the filled schedule
        out, lse = flash_mla_with_kvcache(q, k, bt, sl, D_V, sched, None, causal=True)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert sched.have_initialized and sched.tile_scheduler_metadata.device == device
    with pytest.raises(flashmla.FlashMLAValueError, match="tile_scheduler_metadata.config.h_q"):
        flash_mla_with_kvcache(q[:, :, :8], k, bt, sl, D_V, sched, None, causal=True)


def test_torch_ops_match_the_plain_functions(rng, device):
    import flashmla.ops  # noqa: F401  (registers torch.ops.flashmla.*)

    case = make_case(rng, "bf16", 2, 1, 16, 1, [300, 5], causal=False)
    (q, k, bt, sl), _, _ = torch_case(case, device)
    meta, splits = torch.ops.flashmla.get_mla_metadata(sl, 16, 1)
    out, lse = torch.ops.flashmla.flash_mla_with_kvcache(q, k, bt, sl, D_V, meta, splits, None, False, None, None)
    ref_out, ref_lse = decode(case, device)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    # The fake implementations agree with the real ones on shapes and dtypes (opcheck runs them on FakeTensors).
    torch.library.opcheck(torch.ops.flashmla.get_mla_metadata.default, (sl, 16, 1), test_utils=("test_faketensor",))
    torch.library.opcheck(
        torch.ops.flashmla.flash_mla_with_kvcache.default,
        (q, k, bt, sl, D_V, meta, splits, None, False, None, None),
        test_utils=("test_faketensor",),
    )


def test_torch_compile_fullgraph_traces_a_decode_step(rng, device):
    import flashmla.ops  # noqa: F401

    case = make_case(rng, "bf16", 2, 2, 16, 1, [300, 70], causal=True)
    (q, k, bt, sl), _, _ = torch_case(case, device)

    def step(q, k, bt, sl):
        meta, splits = torch.ops.flashmla.get_mla_metadata(sl, 32, 1)
        out, lse = torch.ops.flashmla.flash_mla_with_kvcache(q, k, bt, sl, D_V, meta, splits, None, True, None, None)
        return out.float() * 2, lse

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    out, lse = compiled(q, k, bt, sl)
    ref_out, ref_lse = decode(case, device)
    assert torch.equal(out, ref_out.float() * 2) and torch.equal(lse, ref_lse)
