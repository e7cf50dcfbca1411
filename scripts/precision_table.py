"""The precision table of docs/precision.md: fp32 / fp16 / int8 / int8-wo / int4-wo exports of one model, compared with fp32.

For each precision: the max |logit - fp32 logit| of the prefill over the prompts, greedy-token
agreement with fp32 (the first generated token, and all of N_NEW tokens), the graph size (every
part's files), and the ORT CPU prefill time and decode time per token as ratios to fp32. Prompts are ShapesVQA test items
(image + question; `--split val` for the val split); the precisions run interleaved prompt by prompt in one process, so machine noise
falls on all of them alike; the ratio is of median prefill times. INT8 calibrates on the built-in
ShapesVQA *train* pairs (or --calib DIR), as int4-wo's AWQ does; `int4-wo-rtn` is int4-wo with round-to-nearest
scales (`--int4-method rtn`).

--eval adds ShapesVQA accuracy at K=576 and K=64 (dpp-merge selector) per precision and its delta to fp32
(`tops_edge.eval.run_eval`); meaningful only for a trained model (--model DIR), not random weights.

  python scripts/precision_table.py [--model tiny-llava-medium] [--prompts 64] [--out /tmp/precision]
                                    [--precisions fp32,fp16,int8,int8-wo,int4-wo,int4-wo-rtn] [--split test|val]
                                    [--eval --eval-items 300 --eval-types T,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRECISIONS = ("fp32", "fp16", "int8", "int8-wo", "int4-wo", "int4-wo-rtn")  # the rows (fp32 always first)
N_NEW = 8


def export_all(model: str, out: Path, calib: str | None, selector: str, precisions=PRECISIONS) -> dict[str, Path]:
    from tops_edge.export import export_model

    dirs = {}
    for precision in precisions:
        t = time.perf_counter()
        rtn = precision == "int4-wo-rtn"
        exported = "int4-wo" if rtn else precision
        calibrated = precision == "int8" or precision == "int4-wo"  # int8's ranges, int4-wo's AWQ scales
        dirs[precision] = export_model(model, out / precision, selector=selector, precision=exported, progress=False,
                                       calib=calib if calibrated else None, int4_method="rtn" if rtn else None)
        print(f"exported {precision} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return dirs


def graph_mib(directory: Path) -> float:
    manifest = json.loads((directory / "manifest.json").read_text())
    return sum(f["bytes"] for part in manifest["parts"].values() for f in part["files"]) / 2**20


def _pipelines(dirs: dict[str, Path], reference: bool) -> dict:
    """One Pipeline per precision. `reference`: ORT with basic graph optimizations only, which runs
    Q/DQ as the ops they are (the arithmetic TensorRT implements); the default fuses them into ORT's
    CPU int8 kernels, which saturate on CPUs without VNNI (u8s8 on AVX2, ORT's reduce_range note)."""
    import onnxruntime as ort

    from tops_edge.runtime import Pipeline
    from tops_edge.runtime.backend import OrtBackend

    pipes = {}
    for precision, directory in dirs.items():
        backend = OrtBackend()
        if reference:
            backend.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        pipe = Pipeline.load(directory)
        pipes[precision] = Pipeline(pipe.directory, pipe.manifest, backend)
    return pipes


def _run(pipes: dict, items) -> tuple[dict, dict, dict]:
    """Prefill logits, greedy tokens and prefill ms per precision; precisions interleaved per prompt."""
    logits: dict[str, list] = {p: [] for p in pipes}
    for precision, pipe in pipes.items():  # keep the prefill's logits (the decoder returns the last row)
        def recording(embeds, positions, *rest, step=pipe.decoder.step, seen=logits[precision]):
            out = step(embeds, positions, *rest)
            if embeds.shape[1] > 1:
                seen.append(np.array(out))
            return out
        pipe.decoder.step = recording
    tokens: dict[str, list] = {p: [] for p in pipes}
    prefill_ms: dict[str, list] = {p: [] for p in pipes}
    decode_ms: dict[str, list] = {p: [] for p in pipes}
    for item in items:
        for precision, pipe in pipes.items():
            r = pipe.generate(item.image, item.prompt, max_new_tokens=N_NEW, ignore_eos=True)
            tokens[precision].append(r.token_ids)
            prefill_ms[precision].append(r.timings_ms["prefill"])
            decode_ms[precision].append(r.timings_ms["decode_per_token"])
    median = lambda d: {p: float(np.median(v)) for p, v in d.items()}  # noqa: E731
    return ({p: np.stack(v) for p, v in logits.items()}, {p: np.array(v) for p, v in tokens.items()},
            median(prefill_ms), median(decode_ms))


def compare(dirs: dict[str, Path], count: int, split: str = "test") -> dict[str, dict]:
    """Per precision: logit deltas, token agreement and prefill times on `count` ShapesVQA prompts,
    on ORT's default CPU kernels and on the Q/DQ reference arithmetic."""
    from tops_edge.eval.tasks import shapesvqa

    items = shapesvqa(count, split=split)
    logits, tokens, ms, decode = _run(_pipelines(dirs, reference=False), items)
    ref_logits, ref_tokens, _, _ = _run(_pipelines(dirs, reference=True), items)
    rows = {}
    for precision, directory in dirs.items():
        rows[precision] = {
            "max_logit_delta": float(np.abs(logits[precision] - logits["fp32"]).max()),
            "max_logit_delta_qdq": float(np.abs(ref_logits[precision] - ref_logits["fp32"]).max()),
            "logit_range": float(np.abs(logits["fp32"]).max()),
            "first_token_agreement": float((tokens[precision][:, 0] == tokens["fp32"][:, 0]).mean()),
            "all_tokens_agreement": float((tokens[precision] == tokens["fp32"]).all(axis=1).mean()),
            "first_token_agreement_qdq": float((ref_tokens[precision][:, 0] == ref_tokens["fp32"][:, 0]).mean()),
            "all_tokens_agreement_qdq": float((ref_tokens[precision] == ref_tokens["fp32"]).all(axis=1).mean()),
            "graph_mib": graph_mib(directory),
            "prefill_ms_median": ms[precision],
            "prefill_ratio": ms[precision] / ms["fp32"],
            "decode_ms_median": decode[precision],
            "decode_ratio": decode[precision] / decode["fp32"],
        }
    return rows


def accuracy(dirs: dict[str, Path], items: int, types=None, split: str = "test") -> dict[str, dict]:
    """ShapesVQA accuracy at K=576 and K=64 per precision on ORT CPU, and for int8 also with the Q/DQ
    reference arithmetic ("int8 ref.", see `_pipelines(reference=True)`)."""
    from tops_edge.eval import run_eval

    out = {}
    ref_pipes = _pipelines({"int8": dirs["int8"]}, reference=True) if "int8" in dirs else {}
    runs = [(p, d, None) for p, d in dirs.items()] + [(f"{p} ref.", dirs[p], pipe) for p, pipe in ref_pipes.items()]
    for name, directory, pipe in runs:
        report = run_eval(directory, "shapesvqa", keeps=[576, 64], selectors=["dpp-merge"], limit=items, types=types,
                          pipeline=pipe, split=split)
        table = report["table"]
        out[name] = {"576": table["unpruned"]["all"]["accuracy"], "64": table["dpp-merge"]["64"]["all"]["accuracy"]}
    return out


def markdown(rows: dict, acc: dict | None, count: int, split: str = "test") -> str:
    head = ("| precision | max logit delta: ORT CPU / Q/DQ ref. | 1st token = fp32: ORT / ref. "
            f"| all {N_NEW} tokens = fp32: ORT / ref. | graph MiB | ORT CPU prefill / fp32 | decode / fp32 "
            "| ShapesVQA acc. delta K=576 | K=64 |")
    lines = [head, "|" + "---|" * 9]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    for precision, r in rows.items():
        if acc:
            d576 = f"{100 * (acc[precision]['576'] - acc['fp32']['576']):+.1f} pt"
            d64 = f"{100 * (acc[precision]['64'] - acc['fp32']['64']):+.1f} pt"
            if f"{precision} ref." in acc:  # ORT CPU / the Q/DQ reference arithmetic
                ref = acc[f"{precision} ref."]
                d576 += f" / {100 * (ref['576'] - acc['fp32']['576']):+.1f} pt"
                d64 += f" / {100 * (ref['64'] - acc['fp32']['64']):+.1f} pt"
        else:
            d576 = d64 = "-"  # no --eval
        lines.append(f"| {precision} | {r['max_logit_delta']:.4f} / {r['max_logit_delta_qdq']:.4f} "
                     f"| {pct(r['first_token_agreement'])} / {pct(r['first_token_agreement_qdq'])} "
                     f"| {pct(r['all_tokens_agreement'])} / {pct(r['all_tokens_agreement_qdq'])} "
                     f"| {r['graph_mib']:.1f} | {r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | {d576} | {d64} |")
    return "\n".join(lines) + (f"\n\n{count} ShapesVQA {split} prompts (greedy, {N_NEW} new tokens); fp32 logits reach "
                               f"|{rows['fp32']['logit_range']:.2f}|; fp32 prefill median {rows['fp32']['prefill_ms_median']:.1f} ms.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llava-medium", help="built-in name or a local HF directory (the trained ShapesVQA model)")
    p.add_argument("--prompts", type=int, default=64, help="ShapesVQA test prompts (>= 50; default 64)")
    p.add_argument("--out", default="/tmp/precision-table", help="where the four exports go")
    p.add_argument("--calib", default=None, help="INT8 calibration folder (default: built-in ShapesVQA train pairs)")
    p.add_argument("--eval", action="store_true", help="add ShapesVQA accuracy deltas at K=576 and K=64")
    p.add_argument("--eval-items", type=int, default=300, help="ShapesVQA items for --eval (default 300)")
    p.add_argument("--eval-types", default=None,
                   help="comma-separated ShapesVQA types for --eval (default: all; docs/precision.md uses the ones the model learned)")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help=f"comma-separated rows, fp32 first (default: {','.join(PRECISIONS)})")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="ShapesVQA split of the prompts and --eval (default test; choose defaults on val)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    precisions = [x for x in args.precisions.split(",") if x]
    if not precisions or precisions[0] != "fp32" or any(x not in PRECISIONS for x in precisions):
        p.error(f"--precisions: fp32 first, then any of {', '.join(PRECISIONS[1:])}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # --eval switches selectors at run time; the dpp-merge export is also what docs/precision.md's K=64 means
    dirs = export_all(args.model, Path(args.out), args.calib, selector="dpp-merge", precisions=precisions)
    rows = compare(dirs, args.prompts, args.split)
    types = [t for t in args.eval_types.split(",") if t] if args.eval_types else None
    acc = accuracy(dirs, args.eval_items, types, args.split) if args.eval else None
    print(markdown(rows, acc, args.prompts, args.split))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "prompts": args.prompts, "split": args.split, "rows": rows,
                                               "accuracy": acc, "eval_items": args.eval_items if acc else None,
                                               "eval_types": types}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
