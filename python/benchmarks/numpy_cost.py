"""Per-call cost of both functions on the smallest valid NumPy problem (a benchmark, not a test).

    python python/benchmarks/numpy_cost.py [--calls N] [--rounds R]

The CPU backend on b = 1, s_q = 1, h_q = 1, bf16 (ml_dtypes), one key in one 64-token page: the work is a single
576-long dot product, so what is timed is the call itself (argument reading, validation, output allocation).
Prints the best of R rounds of N calls, in µs per call.
"""
import argparse
import timeit

import ml_dtypes
import numpy as np

import flashmla

HEAD_DIM_K, HEAD_DIM_V, PAGE = 576, 512, 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    bf16 = ml_dtypes.bfloat16
    q = np.zeros((1, 1, 1, HEAD_DIM_K), dtype=bf16)
    k_cache = np.zeros((1, PAGE, 1, HEAD_DIM_K), dtype=bf16)
    block_table = np.zeros((1, 1), dtype=np.int32)
    seqlens = np.ones((1,), dtype=np.int32)
    meta, splits = flashmla.get_mla_metadata(seqlens, 1, 1)
    rows = {
        "flash_mla_with_kvcache": lambda: flashmla.flash_mla_with_kvcache(
            q, k_cache, block_table, seqlens, HEAD_DIM_V, meta, splits
        ),
        "get_mla_metadata": lambda: flashmla.get_mla_metadata(seqlens, 1, 1),
    }
    for name, fn in rows.items():
        fn()
        best = min(timeit.repeat(fn, number=a.calls, repeat=a.rounds)) / a.calls * 1e6
        print(f"{name}: {best:.1f} µs per call (best of {a.rounds} x {a.calls})")


if __name__ == "__main__":
    main()
