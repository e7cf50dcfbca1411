"""Parity and time of the tops::Select Triton kernel against the torch reference, per N and K.

    python scripts/select_kernel_bench.py                       # on a CUDA GPU: N 576,2880 x K 64,128,192
    TRITON_INTERPRET=1 python scripts/select_kernel_bench.py --n 576 --k 64,128 --runs 1 --block-k 64
                                                                # on the CPU, Triton's interpreter

Prints a markdown table: method, N, K, whether the greedy order equals the reference's, and the
kernel's median time (CUDA events on a GPU, wall time under the interpreter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from tops_edge.plugins.kernel import launch_select, select_order_triton
from tops_edge.plugins.reference import plugin_inputs, select_order

METHODS = {"dpp-merge": dict(alpha=0.5, beta=0.5, sign=1.0), "cdpruner": dict(alpha=0.5, beta=0.0, sign=-1.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="576,2880")
    ap.add_argument("--k", default="64,128,192")
    ap.add_argument("--methods", default="dpp-merge,cdpruner")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--block-k", type=int, default=None)
    args = ap.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cpu" if interpret else "cuda"
    warnings.simplefilter("ignore", RuntimeWarning)
    print(f"device: {'CPU (Triton interpreter)' if interpret else torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| method | N | K | order = reference | kernel median |")
    print("|---|---:|---:|---|---:|")
    for n in map(int, args.n.split(",")):
        g = torch.Generator().manual_seed(n)
        x, q, vf = torch.randn(1, n, 4096, generator=g), torch.randn(1, 16, 4096, generator=g), torch.randn(1, n, 1024, generator=g)
        mask = torch.ones(1, 16, dtype=torch.int64)
        s, c, v = (t.to(device) for t in plugin_inputs(x, q, mask, vf))
        for method in args.methods.split(","):
            p = METHODS[method]
            for k in map(int, args.k.split(",")):
                ref = select_order(s, c, v, k, **p)
                same = torch.equal(select_order_triton(s, c, v, k, block_k=args.block_k, **p), ref)  # also the warm-up
                # the timed launches reuse preallocated buffers: the kernel alone, as inside an engine
                order = torch.empty_like(ref)
                chol = torch.empty_like(s)
                keep = torch.tensor([k], dtype=torch.int32, device=device)
                run = lambda: launch_select(s, c, v, keep, order, chol, block_k=args.block_k, **p)  # noqa: E731
                times = []
                for _ in range(args.runs):
                    if interpret:
                        t = time.perf_counter()
                        run()
                        times.append((time.perf_counter() - t) * 1e3)
                    else:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        run()
                        end.record()
                        torch.cuda.synchronize()
                        times.append(start.elapsed_time(end))
                print(f"| {method} | {n} | {k} | {'yes' if same else 'NO'} | {statistics.median(times):.3f} ms |")


if __name__ == "__main__":
    main()
