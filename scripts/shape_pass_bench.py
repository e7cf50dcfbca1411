"""Paired timing of two decoder graphs (e.g. exported with TOPS_EDGE_SHAPE_PASS=0 and =1) on ORT CPU.

    python scripts/shape_pass_bench.py OLD/decoder.onnx NEW/decoder.onnx [--past 180,630] [--rounds 12]

Both sessions live in one process; each round times OLD and NEW back to back (the order alternates
between rounds, so a busy host slows both alike) and keeps the round's ratio NEW/OLD of the median
step time; the report is the median of those paired ratios, with their spread (min..max), for
decode steps at each past length and for a prefill into an empty cache. Feeds come from
scripts/decoder_step.py (the graph's own IO); both graphs must give the same outputs, which is
checked first. Also prints each graph's node count before and after ORT's own optimizer.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder_step import feeds_for  # noqa: E402


def prefill_feeds(sess, seq: int) -> dict:
    """A prefill of `seq` tokens into an empty cache: the past bound as 0 slots (as the runtime does)."""
    feeds = feeds_for(sess, 0, seq, seed=1)
    return {k: (v[:, :, :0] if k.startswith("past_key_values.") else v) for k, v in feeds.items()}


def node_counts(path: str, threads: int) -> tuple[int, int, collections.Counter]:
    import onnx
    import onnxruntime as ort

    raw = len(onnx.load(path, load_external_data=False).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        opt = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    return raw, len(opt.graph.node), collections.Counter(n.op_type for n in opt.graph.node)


def timed(sess, feeds, n: int) -> float:
    """Median ms of n runs after a warmup."""
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--past", default="180,630", help="cached tokens before a decode step (default: 180,630)")
    ap.add_argument("--steps", type=int, default=60, help="decode steps timed per graph and round (default: 60)")
    ap.add_argument("--rounds", type=int, default=12, help="paired rounds (default: 12)")
    ap.add_argument("--prefill", type=int, default=600, help="prefill length, 0 to skip (default: 600)")
    ap.add_argument("--prefill-runs", type=int, default=3, help="prefills timed per graph and round (default: 3)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default: 1)")
    args = ap.parse_args()
    import onnxruntime as ort

    for label, path in (("old", args.old), ("new", args.new)):
        raw, opt, ops = node_counts(path, args.threads)
        shape = {k: ops[k] for k in ("Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Slice", "Squeeze") if ops[k]}
        print(f"{label}: {raw} nodes, {opt} after ORT's optimizer; {shape}")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = {g: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"])
            for g, p in (("old", args.old), ("new", args.new))}
    pasts = [int(p) for p in args.past.split(",")]
    cases = [(f"step@{p}", feeds_for(sess["old"], p, 1, seed=p), args.steps) for p in pasts]
    if args.prefill:
        cases.append((f"prefill@{args.prefill}", prefill_feeds(sess["old"], args.prefill), args.prefill_runs))
    for name, feeds, _ in cases:
        a, b = sess["old"].run(None, feeds), sess["new"].run(None, feeds)
        diff = max(float(np.abs(x - y).max()) if x.size else 0.0 for x, y in zip(a, b))
        print(f"{name}: max |new - old| over all outputs = {diff:.3g}")
    ratios = {name: [] for name, _, _ in cases}
    ms = {(name, g): [] for name, _, _ in cases for g in sess}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for name, feeds, n in cases:
            t = {g: timed(sess[g], feeds, n) for g in order}
            for g in sess:
                ms[(name, g)].append(t[g])
            ratios[name].append(t["new"] / t["old"])
    for name, _, _ in cases:
        rs = np.array(ratios[name])
        print(f"{name}: old {np.median(ms[(name, 'old')]):.3f} ms, new {np.median(ms[(name, 'new')]):.3f} ms; "
              f"paired new/old median {np.median(rs):.3f} (min {rs.min():.3f}, max {rs.max():.3f}, "
              f"{int((rs < 1).sum())}/{len(rs)} rounds faster)")


if __name__ == "__main__":
    main()
