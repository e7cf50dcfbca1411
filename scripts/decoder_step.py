"""Time one decode step (and a prefill) of decoder graphs side by side on ONNX Runtime CPU.

    python scripts/decoder_step.py OLD/decoder.onnx NEW/decoder.onnx [--past 180,630] [--rounds 4]

Each round runs every graph in turn (so a busy host slows them alike): per graph and past length,
the median of `--steps` decode steps after a warmup, and one prefill of `--prefill` tokens. Inputs
are random, fixed by seed, and the same for every graph; the first logits of each graph are printed
so graphs of the same weights can be seen to agree. Reads the IO from the graph: any tops-edge
decoder export (with or without the attention_bias input of schema 4).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def feeds_for(sess, past: int, seq: int, seed: int) -> dict:
    """A step of `seq` tokens after `past` cached ones. Graphs with `cache_position` (schema 5 and later)
    take a fixed-size cache: here exactly past + seq slots, so both kinds do the same work."""
    rng = np.random.default_rng(seed)
    fixed = any(spec.name == "cache_position" for spec in sess.get_inputs())
    cache = past + seq if fixed else past
    feeds = {}
    for spec in sess.get_inputs():
        name = spec.name
        if name.startswith("past_key_values."):
            heads, dim = spec.shape[1], spec.shape[3]
            feeds[name] = np.zeros((1, heads, cache, dim), np.float32)
            feeds[name][:, :, :past] = rng.standard_normal((1, heads, past, dim), dtype=np.float32)
        elif name == "inputs_embeds":
            feeds[name] = rng.standard_normal((1, seq, spec.shape[-1]), dtype=np.float32)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + seq), np.int64)
        elif name == "attention_bias":
            feeds[name] = np.zeros((1, past + seq), np.float32)
        elif name == "position_ids":
            feeds[name] = np.arange(past, past + seq, dtype=np.int64)[None]
        elif name == "cache_position":
            feeds[name] = np.arange(past, past + seq, dtype=np.int64)
        else:
            raise SystemExit(f"decoder_step: unknown decoder input '{name}'")
    return feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graphs", nargs="+", help="decoder.onnx files")
    ap.add_argument("--past", default="180,630", help="cached tokens before the step (default: 180,630)")
    ap.add_argument("--steps", type=int, default=40, help="timed decode steps per round (default: 40)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds over all graphs (default: 4)")
    ap.add_argument("--prefill", type=int, default=179, help="prefill length (default: 179)")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default: 2)")
    args = ap.parse_args()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {g: ort.InferenceSession(g, opts, providers=["CPUExecutionProvider"]) for g in args.graphs}
    pasts = [int(p) for p in args.past.split(",")]
    steps: dict = {(g, p): [] for g in args.graphs for p in pasts}
    prefill: dict = {g: [] for g in args.graphs}
    for _ in range(args.rounds):
        for g, sess in sessions.items():
            for p in pasts:
                feeds = feeds_for(sess, p, 1, seed=p)
                for _ in range(5):
                    sess.run(None, feeds)
                t = time.perf_counter()
                for _ in range(args.steps):
                    logits = sess.run(None, feeds)[0]
                steps[(g, p)].append((time.perf_counter() - t) / args.steps * 1e3)
            feeds = feeds_for(sess, 0, args.prefill, seed=1)
            t = time.perf_counter()
            sess.run(None, feeds)
            prefill[g].append((time.perf_counter() - t) * 1e3)
    for g in args.graphs:
        cells = "  ".join(f"step@{p}: {np.median(steps[(g, p)]):.2f} ms" for p in pasts)
        first = sessions[g].run(None, feeds_for(sessions[g], pasts[0], 1, seed=pasts[0]))[0].ravel()[:3]
        print(f"{Path(g).parent.name}/{Path(g).name}: {cells}  prefill@{args.prefill}: {np.median(prefill[g]):.1f} ms  "
              f"logits[:3] {np.round(first, 4).tolist()}")


if __name__ == "__main__":
    main()
