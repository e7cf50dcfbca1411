"""Time every selector's ONNX graph on ONNX Runtime CPU at LLaVA shapes, and count its FLOPs.

    python scripts/selector_cost.py [--runs 20] [--json FILE] [--shapes qwen2.5-vl-7b]

Shapes: LLaVA-1.5-7B (N = 576 visual tokens, D = 4096 projected width, E = 1024 CLIP-L width,
K = 64 / 128 / 192) and LLaVA-NeXT-7B's global budget (N = 2880, K = 640). Inputs are random; the
selectors' cost does not depend on the values. The graphs are the ones `tops-export` writes.
GFLOP counts multiply-adds as 2 and cover the matrix work (similarity, relevance, the greedy loop).

Then every stage of the methods that prune in stages (tops, fastv, pdrop, and topv where it is
registered) at --keep T = 128 / 64 / 32 on LLaVA-1.5-7B's 32 layers: each stage's graph on the tokens
alive there (N at that stage, K it keeps), with Q = 32 prompt tokens after the image at a cut.

`--shapes qwen2.5-vl-7b`: Qwen2.5-VL-7B instead (D = 3584, E = 4 x 1280 = 5120, the merger's input;
28 layers), on the token grids its processor gives a 640x480 image (17 x 23 = 391 tokens) and a
1280x720 one (26 x 46 = 1196), the staged methods on the 640x480 one.
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
Q, LAYERS = 32, 32  # prompt tokens after the image (a cut's text rows); LLaVA-1.5-7B's decoder layers
STAGED = ("tops", "topv", "fastv", "pdrop")  # timed per stage (those registered)
CASES = [(576, 64), (576, 128), (576, 192), (2880, 640)]
GRIDS = {576: (24, 24)}  # N -> its (rows, cols); others: one row
STAGED_N = 576
#: --shapes: (D, E, layers, cases, grids, the staged methods' N)
SHAPES = {
    "llava-1.5-7b": (4096, 1024, 32, CASES, GRIDS, 576),
    "qwen2.5-vl-7b": (3584, 5120, 28, [(391, 64), (391, 128), (1196, 128), (1196, 256)],
                      {391: (17, 23), 1196: (26, 46)}, 391),
}
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


def stage_gflop(method: str, n: int, k: int, at: str) -> float:
    """The matrix work of one stage: tops's similarity (plus the text raters' logits at a cut) and
    its O(N^2) coverage per step; topv's N x N feature cost and Sinkhorn; fastv/pdrop: a top-k."""
    if method == "tops":
        return (2 * n * n * D + (2 * n * Q * D if at == "llm" else 0) + 4 * k * n * n) / 1e9
    if method == "topv":
        return (2 * n * n * D + 12 * n * n) / 1e9  # the feature-distance GEMM, then N x N terms
    return 0.0


def _median_ms(sess, feeds: dict, runs: int) -> float:
    f = {i.name: feeds[i.name] for i in sess.get_inputs()}
    sess.run(None, f)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, f)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def staged_rows(rng, runs: int) -> list[dict]:
    """Each stage of each staged method at T = 128, 64, 32 (plan_for on LAYERS layers, N = STAGED_N)."""
    from tops_edge.selector.plan import plan_for

    rows = []
    for method in (m for m in STAGED if m in selector.available()):
        params = selector.get(method).resolve_params({})
        for average in (128, 64, 32):
            try:
                plan = plan_for(method, params, average, STAGED_N, LAYERS)
            except Exception as e:  # noqa: BLE001  (a schedule that cannot reach T: say so in the table)
                print(f"  {method} T={average}: {e}", file=sys.stderr)
                continue
            alive = STAGED_N
            rows_, cols_ = GRIDS[STAGED_N]
            for stage in plan.stages:
                at = "vision" if stage.layer == 0 else "llm"
                n, k = alive, stage.keep
                layout = {"layout": "single", "tokens_per_crop": n, "grid": [rows_, cols_]}
                grid = np.stack(np.divmod(np.arange(n), cols_), -1).astype(np.float32)[None]
                feeds = {
                    "image_features": rng.standard_normal((1, n, D), dtype=np.float32),
                    "vision_features": rng.standard_normal((1, n, E), dtype=np.float32),
                    "cls_attention": rng.random((1, n), dtype=np.float32),
                    "text_attention": rng.random((1, Q, n), dtype=np.float32) / n,
                    "text_features": rng.standard_normal((1, Q, D), dtype=np.float32),
                    "target_features": rng.standard_normal((1, n, D), dtype=np.float32),
                    "token_positions": grid,
                    "lam": np.array(1.0, dtype=np.float32),
                    "keep": np.array(k, dtype=np.int64),
                    "grid_h": np.array(rows_, dtype=np.int64), "grid_w": np.array(cols_, dtype=np.int64),
                }
                part = selector_part(method, params, layout, D, E, merge_outputs=False, at=at)
                sess = ort.InferenceSession(part.onnx_model().SerializeToString(), providers=["CPUExecutionProvider"])
                row = dict(method=method, T=average, layer=stage.layer, n=n, k=k, ms=_median_ms(sess, feeds, runs),
                           gflop=stage_gflop(method, n, k, at))
                rows.append(row)
                print(f"  {method:6s} T={average:4d} layer {stage.layer:2d} N={n:4d} -> K={k:4d} {row['ms']:9.2f} ms "
                      f"{row['gflop']:7.2f} GFLOP", file=sys.stderr, flush=True)
                alive = k
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="timed runs per case (median; default 20, 3 at N=2880)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--staged-only", action="store_true", help="only the per-stage table of the staged methods")
    ap.add_argument("--shapes", default="llava-1.5-7b", choices=sorted(SHAPES), help="model shapes (default: llava-1.5-7b)")
    args = ap.parse_args(argv)
    global D, E, LAYERS, GRIDS, STAGED_N
    D, E, LAYERS, cases, GRIDS, STAGED_N = SHAPES[args.shapes]
    rng = np.random.default_rng(0)
    rows = []
    for n, k in ([] if args.staged_only else cases):
        layout = {"layout": "single", "tokens_per_crop": n, "grid": list(GRIDS.get(n, (1, n)))}
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
            runs = args.runs if n <= 1200 else 3
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
        for _ in range(args.runs if n <= 1200 else 3):
            t = time.perf_counter()
            sess.run(None, f)
            times.append((time.perf_counter() - t) * 1e3)
        rows.append(dict(method="uniform + the token-merge tail", n=n, k=k, ms=statistics.median(times),
                         gflop=round(2 * n * k * D * 2 / 1e9, 2)))
    if rows:
        print(f"| method | N | K | ms (ORT CPU, median of {args.runs}) | GFLOP |\n|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['n']} | {r['k']} | {r['ms']:.2f} | {r['gflop']:.2f} |")
    staged = staged_rows(rng, args.runs)
    print(f"\n| method | T | stage at layer | N -> K | ms (ORT CPU, median of {args.runs}) | GFLOP |\n"
          f"|---|---:|---:|---:|---:|---:|")
    for r in staged:
        print(f"| {r['method']} | {r['T']} | {r['layer']} | {r['n']} -> {r['k']} | {r['ms']:.2f} | {r['gflop']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(threads=ort.SessionOptions().intra_op_num_threads, rows=rows,
                                                   staged=staged), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
