"""Compare torch's two ONNX exporters (legacy TorchScript vs dynamo) on ONNX Runtime CPU.

For each model (built-in tiny-llava and a "medium" tiny LLaVA) and each exporter, exports the vision
and decoder parts, times the export, then times ORT (CPUExecutionProvider, default threads) on:
  vision  - one 336x336 image
  prefill - decoder, S tokens with a zero-length past
  decode  - decoder, 1 token with a past of S tokens
Every timed graph is first checked against the torch module (max |diff| of logits / image features),
and dynamo against legacy, so a speed number never comes from a wrong graph.

  cd /work/main && python scripts/compare_exporters.py [--runs 10] [--decode-runs 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tops_edge.export.onnx_export import export_part  # noqa: E402
from tops_edge.models import load  # noqa: E402

EXPORTERS = ("legacy", "dynamo")


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return first_line(exc)


def models():
    yield "tiny-llava", load("tiny-llava")
    yield "medium", load("tiny-llava-medium")


def cases(adapter, seq: int):
    """(case name, part name, feeds) with fixed random inputs; the decoder gets prefill and decode."""
    rng = np.random.default_rng(0)
    vc = adapter.vision_config
    h, d, e, n = adapter.num_kv_heads, adapter.head_dim, adapter.hidden_size, adapter.num_layers
    kv = [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    f32 = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731

    def decoder(past: int, s: int):  # a fixed-size cache of exactly past + s slots
        feeds = {"inputs_embeds": f32(1, s, e),
                 "attention_mask": np.ones((1, past + s), np.int64),
                 "attention_bias": np.zeros((1, past + s), np.float32),
                 "position_ids": np.arange(past, past + s, dtype=np.int64)[None],
                 "cache_position": np.arange(past, past + s, dtype=np.int64)}
        feeds.update({name: f32(1, h, past + s, d) for name in kv})
        return feeds

    return [
        ("vision", "vision", {"pixel_values": f32(1, vc.num_channels, vc.image_size, vc.image_size)}),
        (f"prefill S={seq}", "decoder", decoder(0, seq)),
        (f"decode past={seq}", "decoder", decoder(seq, 1)),
    ]


def torch_ref(part, feeds) -> np.ndarray:
    names = [s.name for s in part.inputs]
    with torch.no_grad():
        out = part.module(*[torch.from_numpy(feeds[k]) for k in names])
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def time_blocks(sessions: dict, feeds, warmup: int, runs: int) -> dict:
    """Median ms per session over `runs` timed runs, taken in two blocks in A B B A order, each block
    after `warmup` untimed runs. Blocks, not run-by-run turns: ORT's idle worker threads spin for a
    while after a run, and on 2 cores the other session's spinning triples a run's time. The A B B A
    order spreads slow drift (other processes on this shared machine) over every exporter alike."""
    times = {k: [] for k in sessions}
    half = (runs + 1) // 2
    for k in [*sessions, *reversed(list(sessions))]:
        for _ in range(warmup):
            sessions[k].run(None, feeds)
        for _ in range(min(half, runs - len(times[k]))):
            t = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def run_model(label, adapter, args, rows):
    import onnxruntime as ort

    parts = {p.name: p for p in adapter.parts() if p.name in ("vision", "decoder")}
    tests = cases(adapter, args.seq)
    refs = {case: torch_ref(parts[pn], feeds) for case, pn, feeds in tests}
    with tempfile.TemporaryDirectory(prefix="cmp-exp-") as tmp:
        built = {}  # (exporter, part) -> (path or None, export seconds, error, root cause)
        for exporter in EXPORTERS:
            for pn, part in parts.items():
                path, err, cause = Path(tmp) / f"{label}-{exporter}-{pn}.onnx", None, None
                t = time.perf_counter()
                try:
                    export_part(part, path, opset=args.opset, exporter=exporter)
                except Exception as exc:
                    path, err, cause = None, f"export failed: {first_line(exc)}", root_cause(exc)
                built[(exporter, pn)] = (path, time.perf_counter() - t, err, cause)
                print(f"  exported {label} {pn} with {exporter}: {built[(exporter, pn)][1]:.2f} s"
                      + (f" FAILED ({err})" if err else ""), file=sys.stderr, flush=True)
        for case, pn, feeds in tests:
            case_rows, sessions, outs = {}, {}, {}
            for (exporter, part_name), (path, secs, err, cause) in built.items():
                if part_name != pn:
                    continue
                row = case_rows[exporter] = dict(model=label, part=case, exporter=exporter, export_s=secs,
                                                 ort_ms=None, ort_min_ms=None, diff_torch=None, diff_legacy=None, error=err, cause=cause)
                if path is None:
                    continue
                try:  # open and check first: a speed number must never come from a wrong graph
                    sessions[exporter] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    outs[exporter] = sessions[exporter].run(None, feeds)[0]
                except Exception as exc:
                    sessions.pop(exporter, None)
                    row["error"], row["cause"] = f"ORT failed: {first_line(exc)}", root_cause(exc)
                    continue
                row["diff_torch"] = float(np.abs(outs[exporter] - refs[case]).max())
                if exporter != "legacy" and "legacy" in outs:
                    row["diff_legacy"] = float(np.abs(outs[exporter] - outs["legacy"]).max())
            runs = args.decode_runs if case.startswith("decode") else args.runs
            for exporter, (ms, best) in time_blocks(sessions, feeds, args.warmup, runs).items():
                case_rows[exporter].update(ort_ms=ms, ort_min_ms=best)
                print(f"  {label:10s} {case:17s} {exporter:9s} {ms:9.2f} ms (min {best:.2f})", file=sys.stderr, flush=True)
            rows.extend(case_rows.values())


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows, tol: float) -> str:
    out = ["| model | part | exporter | export s | ORT median ms | min ms | dynamo/legacy | max\\|Δ\\| vs torch | max\\|Δ\\| vs legacy |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "-"
        if r["exporter"] != "legacy":
            base = next(b for b in rows if b["model"] == r["model"] and b["part"] == r["part"] and b["exporter"] == "legacy")
            if r["ort_ms"] and base["ort_ms"]:
                ratio = f"{r['ort_ms'] / base['ort_ms']:.2f}"
        ms = r["error"][:110] + "…" if r["error"] else fmt(r["ort_ms"], ".2f")
        if r["diff_torch"] is not None and r["diff_torch"] > tol:
            ms += " (WRONG OUTPUT)"
        out.append(f"| {r['model']} | {r['part']} | {r['exporter']} | {r['export_s']:.2f} | {ms} | {fmt(r['ort_min_ms'], '.2f')} | {ratio} "
                   f"| {fmt(r['diff_torch'], '.2e')} | {fmt(r['diff_legacy'], '.2e')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="timed runs for vision and prefill (median; default 10)")
    ap.add_argument("--decode-runs", type=int, default=50, help="timed runs for decode (median; default 50)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    ap.add_argument("--seq", type=int, default=600, help="prefill length and decode past length (default 600)")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--tol", type=float, default=1e-3, help="max |diff| vs torch above which a row is flagged")
    ap.add_argument("--json", metavar="FILE", help="also write the rows and tool versions as JSON")
    args = ap.parse_args(argv)
    args.warmup = max(0, args.warmup)

    import onnx
    import onnxruntime
    import transformers

    versions = dict(torch=torch.__version__, transformers=transformers.__version__, onnx=onnx.__version__,
                    onnxruntime=onnxruntime.__version__, python=platform.python_version())
    print(f"versions: {versions}", file=sys.stderr)
    # warm-up: each exporter's one-time imports and setup would otherwise land in the first timed export
    warm = load("tiny-llava")
    embed = next(p for p in warm.parts() if p.name == "embed")
    with tempfile.TemporaryDirectory() as tmp:
        for exporter in EXPORTERS:
            try:
                export_part(embed, Path(tmp) / f"embed-{exporter}.onnx", opset=args.opset, exporter=exporter)
            except Exception as exc:
                print(f"warm-up export ({exporter}) failed: {first_line(exc)}", file=sys.stderr)

    rows = []
    for label, adapter in models():
        run_model(label, adapter, args, rows)
    print(table(rows, args.tol))
    failures = [r for r in rows if r["error"]]
    for r in failures:
        print(f"\nFAILED: {r['model']} / {r['part']} / {r['exporter']}: {r['error']}\n  root cause: {r['cause']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(versions=versions, args=vars(args), rows=rows), indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
