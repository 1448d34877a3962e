"""Where the host time of one `flash_mla_with_kvcache` / `get_mla_metadata` call goes (a benchmark, not a test).

    python python/benchmarks/host_cost.py [--device cuda|cpu] [--calls N] [--rounds R] [--upstream PATH]

Times, per call (R rounds of N calls per row, queued without synchronising, as an engine calls them; the rows
interleaved within each round; min, median and max over the rounds):
  - both functions of `flashmla` on the smallest decode problem (b = 1, s_q = 1, h_q = 16, bf16, 64 keys),
  - the Python-level operations the compiled module performs on each call: the attribute reads of every tensor
    argument, the three `Tensor.new_empty` allocations (out, lse, workspace), PyTorch's current stream,
  - a no-op call into the compiled module (the PyO3 call itself),
and prints what is left: the library's own host work (validation, TMA descriptors, kernel launches).
With `--upstream PATH` (a directory holding upstream's `flash_mla` package) upstream's two calls are timed too.
The kernels are tiny (a few µs of GPU time), so on a GPU the queue never fills and the figures are host time.
"""
import argparse
import sys
import timeit

import torch


def timed_rounds(rows, calls, rounds, sync):
    """µs per call of every row, `rounds` times, the rows interleaved within each round (so a slow spell of the
    host hits every row alike): {name: sorted list}."""
    for _, fn in rows:
        fn()
    sync()
    got = {name: [] for name, _ in rows}
    for _ in range(rounds):
        for name, fn in rows:
            t = timeit.timeit(fn, number=calls)
            sync()
            got[name].append(t / calls * 1e6)
    return {k: sorted(v) for k, v in got.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--upstream", help="directory of upstream FlashMLA's built package, to time it too")
    args = ap.parse_args()

    import flashmla
    from flashmla import _native

    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    # One page: the kernels take less time than the host's share of a call, so the queue never fills (on the CPU
    # the backend computes on the calling thread, and one page keeps that small too).
    s_k = 64
    b, s_q, h_q, h_kv, d, dv, page = 1, 1, 16, 1, 576, 512, 64
    torch.manual_seed(0)
    seqlens = torch.full((b,), s_k, dtype=torch.int32, device=dev)
    bt = torch.arange(b * s_k // page, dtype=torch.int32, device=dev).view(b, -1)
    kv = torch.randn(b * s_k // page, page, h_kv, d, dtype=torch.bfloat16, device=dev) / 10
    q = torch.randn(b, s_q, h_q, d, dtype=torch.bfloat16, device=dev) / 10
    meta, splits = flashmla.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    tensors = (q, kv, bt, seqlens, meta, splits)
    ws_bytes = 1 << 20

    def attrs():
        for t in tensors:
            t.dtype, t.shape, t.stride(), t.data_ptr(), t.get_device(), t.is_cuda

    def allocs():
        q.new_empty((b, s_q, h_q, dv))
        q.new_empty((b, h_q, s_q), dtype=torch.float32)
        q.new_empty((ws_bytes,), dtype=torch.uint8)

    raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    f32, u8 = torch.float32, torch.uint8
    # One operation at a time (not added into the parts above): which of them dominate.
    singles = [
        ("    q.dtype", lambda: q.dtype),
        ("    q.shape", lambda: q.shape),
        ("    q.stride()", lambda: q.stride()),
        ("    q.data_ptr()", lambda: q.data_ptr()),
        ("    q.get_device()", lambda: q.get_device()),
        ("    q.is_cuda", lambda: q.is_cuda),
        ("    q.new_empty(shape)", lambda: q.new_empty((b, s_q, h_q, dv))),
        ("    q.new_empty(shape, dtype=float32)", lambda: q.new_empty((b, h_q, s_q), dtype=f32)),
        ("    q.new_empty((1 MiB,), dtype=uint8)", lambda: q.new_empty((ws_bytes,), dtype=u8)),
        ("    torch.empty(shape, dtype=, device=)", lambda: torch.empty((b, h_q, s_q), dtype=f32, device=q.device)),
    ]
    rows = [
        ("flashmla flash_mla_with_kvcache", lambda: flashmla.flash_mla_with_kvcache(q, kv, bt, seqlens, dv, meta, splits, causal=True)),
        ("flashmla get_mla_metadata", lambda: flashmla.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)),
        ("  no-op call into the module", _native.library_version),
        ("  attribute reads of the 6 tensors", attrs),
        ("  3 x Tensor.new_empty", allocs),
    ]
    if dev.startswith("cuda") and raw_stream is not None:
        rows.append(("  current stream (_cuda_getCurrentRawStream)", lambda: raw_stream(q.get_device())))
    rows += singles
    if args.upstream:
        sys.path.insert(0, args.upstream)
        import flash_mla as up

        up_meta, up_splits = up.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
        rows.append(("upstream flash_mla_with_kvcache", lambda: up.flash_mla_with_kvcache(q, kv, bt, seqlens, dv, up_meta, up_splits, causal=True)))
        rows.append(("upstream get_mla_metadata", lambda: up.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)))

    print(f"device {dev}, torch {torch.__version__}, flashmla {flashmla.__version__}, {args.rounds} rounds of "
          f"{args.calls} calls per row, rows interleaved; us per call")
    got = timed_rounds(rows, args.calls, args.rounds, sync)
    print(f"{'':46s} {'min':>7s} {'median':>7s} {'max':>7s}")
    for name, v in got.items():
        print(f"{name:46s} {v[0]:7.2f} {v[len(v) // 2]:7.2f} {v[-1]:7.2f}")
    best = {k: v[0] for k, v in got.items()}
    parts = sum(best[k] for k in best if k.startswith("  ") and not k.startswith("    "))
    rest = best["flashmla flash_mla_with_kvcache"] - parts
    print(f"{'  left for the library (decode - the parts; min)':46s} {rest:7.2f}")


if __name__ == "__main__":
    main()
