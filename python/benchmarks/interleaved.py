"""Upstream FlashMLA and flashmla on the same tensors, in one process, interleaved (a benchmark, not a test).

    python python/benchmarks/interleaved.py --upstream PATH [--cases 128x4096x128x2,...] [--rounds 2]
    python python/benchmarks/interleaved.py --upstream PATH --once flashmla|upstream --cases 128x4096x128x2

Each case is `b x s_k x h_q x s_q` (bf16, h_kv = 1, 64-token pages, causal, randn q and cache, arange block
tables, upstream's test inputs). For each case and round, each library is timed four ways: triton's `do_bench`
(mean and median, L2 flushed before each call, as upstream's test files), 50 calls queued back to back between two
CUDA events, and a CUDA graph of one call replayed 50 times. Because both libraries read the same tensors in the
same process, a difference is the kernels', not the inputs' or the harness's.

Each timing window also records the SM clock and power that `nvidia-smi` reported during it (sampled every 50 ms
in the background, when nvidia-smi is there), so a difference that comes from the clock under the power limit shows
as a lower clock, not as a slower kernel.

`--once LIB` runs LIB's decode a few times on the first case and exits: the target for `ncu` (profile both
libraries' split kernels on identical inputs).
"""
import argparse
import math
import shutil
import subprocess
import sys
import time


def parse_case(text):
    b, s_k, h_q, s_q = (int(v) for v in text.split("x"))
    return b, s_k, h_q, s_q


class Clocks:
    """nvidia-smi's SM clock (MHz) and power (W), sampled in the background with host timestamps."""

    def __init__(self):
        self.proc = None
        if shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"],
            stdout=subprocess.PIPE, text=True, bufsize=1)
        self.samples = []  # (host time, MHz, W)
        import threading

        def reader():
            for line in self.proc.stdout:
                try:
                    mhz, watts = (float(v) for v in line.split(","))
                except ValueError:
                    continue
                self.samples.append((time.time(), mhz, watts))

        threading.Thread(target=reader, daemon=True).start()

    def window(self, t0, t1):
        got = [(m, w) for t, m, w in self.samples if t0 <= t <= t1]
        if not got:
            return "clock n/a"
        mhz = sorted(m for m, _ in got)[len(got) // 2]
        watts = sorted(w for _, w in got)[len(got) // 2]
        return f"{mhz:5.0f} MHz {watts:4.0f} W ({len(got)} samples)"

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="directory holding upstream's built flash_mla package")
    ap.add_argument("--cases", default="128x4096x128x2,128x4096x128x1,128x16384x128x2,128x4096x16x1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--once", choices=["flashmla", "upstream"])
    args = ap.parse_args()
    import torch

    import flashmla as ours

    libs = {"flashmla": ours}
    if args.once != "flashmla":
        # Only what is asked for is imported: `--once flashmla` runs where upstream is not built.
        sys.path.insert(0, args.upstream)
        import flash_mla as up

        libs = {"upstream": up, "flashmla": ours}
    cases = [parse_case(c) for c in args.cases.split(",")]
    torch.manual_seed(0)
    dev = "cuda"

    def tensors(b, s_k, h_q, s_q):
        h_kv, d, page = 1, 576, 64
        lens = torch.full((b,), s_k, dtype=torch.int32, device=dev)
        padded = math.ceil(s_k / 256) * 256
        bt = torch.arange(b * padded // page, dtype=torch.int32, device=dev).view(b, padded // page)
        q = torch.randn(b, s_q, h_q, d, dtype=torch.bfloat16, device=dev)
        k = torch.randn(bt.numel(), page, h_kv, d, dtype=torch.bfloat16, device=dev)
        return q, k, bt, lens

    def call(lib, q, k, bt, lens):
        s_q, h_q = q.shape[1], q.shape[2]
        md, ns = lib.get_mla_metadata(lens, s_q * h_q, 1)
        return lambda: lib.flash_mla_with_kvcache(q, k, bt, lens, 512, md, ns, causal=True)

    if args.once:
        f = call(libs[args.once], *tensors(*cases[0]))
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        return

    import triton

    clocks = Clocks()
    time.sleep(0.3)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, flashmla {ours.__version__}")
    for case in cases:
        t = tensors(*case)
        for rnd in range(args.rounds):
            for name, lib in libs.items():
                f = call(lib, *t)
                f()
                torch.cuda.synchronize()
                t0 = time.time()
                mean = triton.testing.do_bench(f)
                med = triton.testing.do_bench(f, return_mode="median")
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                ev[0].record()
                for _ in range(50):
                    f()
                ev[1].record()
                torch.cuda.synchronize()
                queued = ev[0].elapsed_time(ev[1]) / 50
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    f()
                g.replay()
                torch.cuda.synchronize()
                ev[0].record()
                for _ in range(50):
                    g.replay()
                ev[1].record()
                torch.cuda.synchronize()
                graph = ev[0].elapsed_time(ev[1]) / 50
                t1 = time.time()
                b, s_k, h_q, s_q = case
                print(f"{b}x{s_k}x{h_q}x{s_q} round {rnd} {name:8s} do_bench mean {mean * 1e3:7.1f} us "
                      f"median {med * 1e3:7.1f} us  queued {queued * 1e3:7.1f} us  graph {graph * 1e3:7.1f} us  "
                      f"{clocks.window(t0, t1)}", flush=True)
    clocks.stop()


if __name__ == "__main__":
    main()
