"""Time every selector's ONNX graph on ONNX Runtime CPU at LLaVA shapes, and count its FLOPs.

    python scripts/selector_cost.py [--runs 20] [--json FILE]

Shapes: LLaVA-1.5-7B (N = 576 visual tokens, D = 4096 projected width, E = 1024 CLIP-L width,
K = 64 / 128 / 192) and LLaVA-NeXT-7B's global budget (N = 2880, K = 640). Inputs are random; the
selectors' cost does not depend on the values. The graphs are the ones `tops-export` writes.
GFLOP counts multiply-adds as 2 and cover the matrix work (similarity, relevance, the greedy loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tops_edge import selector  # noqa: E402
from tops_edge.selector.parts import selector_part  # noqa: E402

D, E, M = 4096, 1024, 16  # projected width, vision width, instruction tokens
CASES = [(576, 64), (576, 128), (576, 192), (2880, 640)]
VARIANTS = [  # (label, method, params)
    ("dpp-merge", "dpp-merge", {}),
    ("dpp-merge without the spatial factor (v1)", "dpp-merge", {"spatial": 0.0}),
    ("dpp-merge (similarity on projected)", "dpp-merge", {"similarity": "projected"}),
    ("cdpruner", "cdpruner", {}),
    ("divprune", "divprune", {}),
    ("attention", "attention", {}),
    ("uniform", "uniform", {}),
    ("random", "random", {}),
]


def gflop(method: str, params: dict, n: int, k: int) -> float:
    if method in ("dpp-merge", "cdpruner", "divprune"):
        width = E if params.get("similarity") == "vision" else D
        flops = 2 * n * n * width  # similarity
        if method != "divprune":
            flops += 2 * n * D  # relevance
            flops += sum(2 * i * n for i in range(k))  # Cholesky rows
            if params.get("beta", 0):
                flops += sum(2 * n * n + 4 * i * n for i in range(k))  # coverage: R e
        return flops / 1e9
    return 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="timed runs per case (median; default 20, 3 at N=2880)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for n, k in CASES:
        side = int(round(n**0.5))
        layout = {"layout": "single", "tokens_per_crop": n, "grid": [side, side] if side * side == n else [1, n]}
        feeds = {
            "image_features": rng.standard_normal((1, n, D), dtype=np.float32),
            "vision_features": rng.standard_normal((1, n, E), dtype=np.float32),
            "instruction_embeds": rng.standard_normal((1, M, D), dtype=np.float32),
            "instruction_mask": np.ones((1, M), np.int64),
            "cls_attention": rng.random((1, n), dtype=np.float32),
            "keep": np.array(k, dtype=np.int64),
            "grid_h": np.array(layout["grid"][0], dtype=np.int64),
            "grid_w": np.array(layout["grid"][1], dtype=np.int64),
        }
        for label, method, overrides in VARIANTS:
            params = selector.get(method).resolve_params(overrides)
            part = selector_part(method, params, layout, D, E, merge_outputs=False)  # the selection alone
            sess = ort.InferenceSession(part.onnx_model().SerializeToString(), providers=["CPUExecutionProvider"])
            f = {i.name: feeds[i.name] for i in sess.get_inputs()}
            sess.run(None, f)
            runs = args.runs if n <= 576 else 3
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, f)
                times.append((time.perf_counter() - t) * 1e3)
            row = dict(method=label, n=n, k=k, ms=statistics.median(times), gflop=gflop(method, params, n, k))
            rows.append(row)
            print(f"  {label:32s} N={n:5d} K={k:4d} {row['ms']:9.2f} ms  {row['gflop']:7.2f} GFLOP", file=sys.stderr, flush=True)
        # the token-merge tail every exported selector graph carries (selector/merge.py): uniform's
        # graph with it, whose selection itself costs well under a millisecond
        params = selector.get("uniform").resolve_params({})
        sess = ort.InferenceSession(selector_part("uniform", params, layout, D, E).onnx_model().SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        f = {i.name: feeds[i.name] for i in sess.get_inputs()}
        sess.run(None, f)
        times = []
        for _ in range(args.runs if n <= 576 else 3):
            t = time.perf_counter()
            sess.run(None, f)
            times.append((time.perf_counter() - t) * 1e3)
        rows.append(dict(method="uniform + the token-merge tail", n=n, k=k, ms=statistics.median(times),
                         gflop=round(2 * n * k * D * 2 / 1e9, 2)))
    print(f"| method | N | K | ms (ORT CPU, median of {args.runs}) | GFLOP |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['n']} | {r['k']} | {r['ms']:.2f} | {r['gflop']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(threads=ort.SessionOptions().intra_op_num_threads, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
