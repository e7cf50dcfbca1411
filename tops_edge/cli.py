"""Command-line entry points: thin layers over `tops_edge.export.export_model` and `tops_edge.runtime.Pipeline`.

Every error a user can cause prints one line on stderr and exits non-zero; no tracebacks
(set TOPS_EDGE_DEBUG=1 to see one for an unexpected failure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from .errors import TopsError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _run_cli(prog: str, fn, argv) -> int:
    try:
        return fn(argv) or 0
    except SystemExit as stop:  # argparse: --help (0) or a usage error it already printed (2)
        return stop.code if isinstance(stop.code, int) else 2
    except TopsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback on request
        if os.environ.get("TOPS_EDGE_DEBUG"):
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"{prog}: internal error: {type(exc).__name__}: {first} (TOPS_EDGE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 70


def _layers(text: str) -> list[int]:
    """--cuts 2,12,24 -> [2, 12, 24]; the exporter checks them against the model's depth."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cuts takes comma-separated decoder layers, got {text!r}") from None


# --- tops-export ---------------------------------------------------------------------------
def export_parser() -> argparse.ArgumentParser:
    from . import selector
    from .export.exporter import DEFAULT_EXPORTER, PRECISIONS, TARGETS
    from .selector.merge import MERGES
    from .export.onnx_export import EXPORTERS
    from .models import aliases, builtin_models
    from .runtime.layout import BUDGETS, POSITIONS

    p = _Parser(
        prog="tops-export",
        description="Split a LLaVA-class model into ONNX parts (vision, selector, embed, decoder) plus a manifest.",
        epilog=f"built-in models (no download): {', '.join(builtin_models())}; aliases: {', '.join(sorted(aliases()))}",
    )
    p.add_argument("--model", required=True, help="hub id (llava-hf/llava-1.5-7b-hf), alias, local HF directory, or built-in tiny model")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--selector", default="none", choices=selector.available(), help="visual-token selector baked into the selector graph (default: none)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, default=None, help="default visual-token budget K (the runtime can change it); default: all tokens")
    budget.add_argument("--keep-ratio", type=float, default=None, metavar="R",
                        help="default budget as a fraction of each image's visual tokens, K = ceil(R*N) (0.222: LLaVA-NeXT 2880 -> 640)")
    p.add_argument("--budget", default="proportional", choices=BUDGETS,
                   help="LLaVA-NeXT: split K over the base view and crops in proportion to their tokens, or select "
                        "globally over the whole image (default: proportional); row newlines are always kept")
    tops = p.add_argument_group("selector parameters (defaults per method; see docs/selectors.md)")
    tops.add_argument("--alpha", type=float, default=None, help="dpp-merge/cdpruner: weight of task relevance in the kernel; tops/topv: weight of diversity / feature cost (0 = off)")
    tops.add_argument("--beta", type=float, default=None, help="dpp-merge: weight of information coverage (0 = CDPruner's greedy); topv: weight of the spatial cost")
    tops.add_argument("--relevance-sign", type=float, default=None, choices=(1.0, -1.0), help="dpp-merge/cdpruner: sign of cos(token, instruction)")
    tops.add_argument("--similarity", default=None, choices=("vision", "projected"), help="dpp-merge/cdpruner/divprune: features for token similarity")
    tops.add_argument("--spatial", type=float, default=None,
                      help="dpp-merge/cdpruner: width of the spatial factor in units of the kept-token spacing sqrt(N/K) (0 = off)")
    tops.add_argument("--selector-seed", type=int, default=None, help="random: the seed of the subset")
    tops.add_argument("--selector-param", action="append", default=[], metavar="KEY=VALUE",
                      help="any parameter of the selector, repeatable (e.g. --selector-param stages=1 "
                           "--selector-param lam2=1.0 for tops, layer=3 for fastv); docs/selectors.md lists them")
    from .plan import PLAN_PRECISIONS, PRESETS

    p.add_argument("--precision", default="fp32", choices=tuple(dict.fromkeys(PRECISIONS + PLAN_PRECISIONS)),
                   help="graph precision: fp32, fp16, int8 (Q/DQ, calibrated), int8-wo (weight-only INT8 decoder) or "
                        "int4-wo (weight-only INT4 decoder, AWQ scales; docs/precision.md); default: fp32")
    p.add_argument("--calib", default=None, metavar="DIR",
                   help="--precision int8, or int4-wo with AWQ: calibrate on DIR's images + prompts.jsonl (default: "
                        "built-in ShapesVQA pairs)")
    p.add_argument("--int4-method", default=None, choices=("awq", "rtn"),
                   help="--precision int4-wo: awq (per-channel scales searched on the calibration prefills) or rtn "
                        "(plain round-to-nearest); default: awq")
    p.add_argument("--target", default="ort", choices=TARGETS, help="deployment target: ort, or trt (the selector as the tops::Select TensorRT plugin; default: ort)")
    p.add_argument("--device", default=None, choices=tuple(PRESETS), help="plan memory for this device and refuse a model that does not fit it")
    p.add_argument("--dry-run", action="store_true", help="with --device: print the memory plan and export nothing (needs no weights)")
    p.add_argument("--lm-head-chunks", type=int, default=None, metavar="N",
                   help="compute the LM head as N MatMuls over vocabulary slices (the same logits; smaller GEMMs for a "
                        "TensorRT build's workspace); default: what the --device plan asks for, else 1")
    p.add_argument("--positions", default=None, choices=POSITIONS, help="position ids after pruning: compact renumbers the kept tokens, original keeps theirs (default: compact; Qwen-VL's M-RoPE: original, the only one it takes)")
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="N",
                   help="dynamic-resolution models (Qwen-VL): at most N visual tokens per image (the image processor's "
                        "max_pixels becomes N x 28 x 28); default: the model's own cap")
    p.add_argument("--cuts", default=None, type=_layers, metavar="L,...",
                   help="export the decoder in segments cut before these layers (e.g. 2,12,24), so selectors can "
                        "prune inside the LLM there; default: the selector's own cuts (none before the LLM)")
    p.add_argument("--merge", default=None, choices=MERGES,
                   help="what the dropped visual tokens leave: mean = each joins its most similar kept token, which "
                        "becomes the group's mean and weighs as its size in attention; none = selection only (default: "
                        "the method's own: none for tops, as in the paper; mean for dpp-merge and the other pre-LLM methods)")
    p.add_argument("--exporter", default=DEFAULT_EXPORTER, choices=EXPORTERS, help=f"torch.onnx exporter (default: {DEFAULT_EXPORTER}, chosen on measured ORT speed)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it only shows on a terminal anyway)")
    return p


def _export(argv) -> int:
    args = export_parser().parse_args(argv)
    if args.dry_run:
        return _plan_only(args)
    from .export import export_model

    params = {"alpha": args.alpha, "beta": args.beta, "relevance_sign": args.relevance_sign,
              "similarity": args.similarity, "spatial": args.spatial, "seed": args.selector_seed}
    for pair in args.selector_param:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            from .errors import InputError

            raise InputError(f"--selector-param takes KEY=VALUE, got '{pair}'")
        params[key.strip().replace("-", "_")] = value.strip()
    out = export_model(
        args.model, args.out, selector=args.selector, keep=args.keep, keep_ratio=args.keep_ratio,
        budget=args.budget, precision=args.precision, int4_method=args.int4_method,
        target=args.target, exporter=args.exporter, opset=args.opset, positions=args.positions,
        max_image_tokens=args.max_image_tokens, lm_head_chunks=args.lm_head_chunks,
        merge=args.merge, selector_params={k: v for k, v in params.items() if v is not None},
        progress=not args.quiet and sys.stderr.isatty(), device=args.device, calib=args.calib, cuts=args.cuts,
    )
    if not args.quiet:
        print(f"exported {args.model} -> {out}", file=sys.stderr)
    return 0


def _plan_only(args) -> int:
    """tops-export --dry-run: the plan table on stdout; a plan that does not fit is then refused."""
    from .errors import InputError
    from .models.architecture import load_architecture
    from .plan import PRESETS, check_fits, footprint_of, format_plan, get_preset, plan_memory

    if args.device is None:
        raise InputError("--dry-run plans memory for a device: add --device (" + ", ".join(PRESETS) + ")")
    adapter = load_architecture(args.model)
    if args.max_image_tokens is not None:
        adapter.cap_image_tokens(args.max_image_tokens)
    footprint, device = footprint_of(adapter), get_preset(args.device)
    plan = plan_memory(footprint, device, args.precision, adapter.source)
    if args.lm_head_chunks is not None:
        from .plan.memory import vocabulary_chunks

        plan.head_chunks = len(vocabulary_chunks(footprint.vocab_size, args.lm_head_chunks))
    print(format_plan(plan))
    from .plan.build import format_build, plan_build

    print(format_build(plan_build(footprint, device, args.precision)))
    check_fits(footprint, device, args.precision, adapter.source)
    return 0


def export_main(argv=None) -> int:
    return _run_cli("tops-export", _export, argv)


# --- tops-run ------------------------------------------------------------------------------
def run_parser() -> argparse.ArgumentParser:
    from .runtime import BACKENDS
    from .runtime.layout import BUDGETS

    p = _Parser(prog="tops-run", description="Answer a prompt about an image with an exported model directory.")
    p.add_argument("dir", help="a tops-export output directory")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="the question; the model's chat template and image slot are added")
    p.add_argument("--raw-prompt", action="store_true", help="the prompt is already templated and holds the image slot itself")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, default=None, help="visual tokens to keep (default: the export's budget)")
    budget.add_argument("--keep-ratio", type=float, default=None, metavar="R", help="keep ceil(R*N) of the image's N visual tokens")
    p.add_argument("--budget", default=None, choices=BUDGETS, help="LLaVA-NeXT: how K is split over the crops (default: the export's)")
    p.add_argument("--merge", default=None, choices=("mean", "none"),
                   help="merge the dropped visual tokens into the kept ones (mean) or only select (none); default: the export's")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens (benchmarking)")
    p.add_argument("--backend", default="ort", choices=BACKENDS, help="inference backend (default: ort)")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, kept_indices, timings_ms, "
                                                      "kv_cache_bytes, num_visual_tokens, keep, kept_sizes")
    p.add_argument("--show-kept", default=None, metavar="PNG",
                   help="write the image as the model saw it with the kept patches outlined (merged groups tinted "
                        "by their kept token's colour)")
    p.add_argument("--quiet", action="store_true", help="print the answer only (no statistics line on stderr)")
    return p


def _run(argv) -> int:
    args = run_parser().parse_args(argv)
    from .runtime import Pipeline

    if args.show_kept is not None:  # fail before the model runs, not after
        from .bench.report import check_writable

        check_writable(args.show_kept)
    pipe = Pipeline.load(args.dir, backend=args.backend)
    if args.merge is not None:
        pipe.merge = args.merge
    options = dict(
        max_new_tokens=args.max_new_tokens, keep=args.keep, keep_ratio=args.keep_ratio, budget=args.budget,
        temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, raw_prompt=args.raw_prompt, ignore_eos=args.ignore_eos,
    )
    if args.json:
        r = pipe.generate(args.image, args.prompt, **options)
        print(json.dumps(r.to_json()))
    else:
        stream = pipe.stream(args.image, args.prompt, **options)
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        r = stream.result
    if args.show_kept is not None:
        from .runtime.kept_view import Stage, show_kept

        show_kept(pipe, args.image, Stage.all_of(r), args.show_kept, title=f"{args.prompt!r} -> {r.text.strip()!r}")
        if not args.quiet:
            print(f"wrote {args.show_kept}", file=sys.stderr)
    if args.json or args.quiet:
        return 0
    t = r.timings_ms
    tps = 1e3 / t["decode_per_token"] if t["decode_per_token"] else 0.0
    print(
        f"[{len(r.kept_indices)}/{r.num_visual_tokens} visual tokens, prompt {r.prompt_tokens} tokens, "
        f"vision {t['vision']:.1f} ms, prefill {t['prefill']:.1f} ms, decode {tps:.1f} tok/s, "
        f"KV cache {r.kv_cache_bytes / 2**20:.2f} MiB]",
        file=sys.stderr,
    )
    return 0


def run_main(argv=None) -> int:
    return _run_cli("tops-run", _run, argv)


# --- tops-bench ----------------------------------------------------------------------------
def bench_parser() -> argparse.ArgumentParser:
    from .runtime import BACKENDS
    from .runtime.layout import BUDGETS

    p = _Parser(
        prog="tops-bench",
        description="Time an exported model per visual-token budget: stage latencies (median, p90), TTFT, TPOT, "
                    "decode tokens/s, KV-cache bytes and peak RSS, beside the FLOP and weight-read limits; "
                    "optionally against HF transformers or llama.cpp.",
    )
    p.add_argument("dir", help="a tops-export output directory")
    p.add_argument("--keep", default=None, help="comma-separated budgets, e.g. 576,192,128,64 (default: N, then 192,128,64 below N)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per budget (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per budget first (default: 1)")
    p.add_argument("--prompt-len", type=int, default=32, help="length of the question in text tokens, about (default: 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per run; EOS may end a run early (default: 32)")
    p.add_argument("--image", default=None, help="image file (default: a synthetic 336x336 scene)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as one JSON object (schema: docs/benchmark.md)")
    p.add_argument("--csv", default=None, metavar="FILE", help="write one CSV row per budget")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG of TTFT and KV-cache bytes against kept tokens (needs matplotlib)")
    p.add_argument("--compare", default=None, choices=("hf", "llama.cpp"),
                   help="also time HF transformers' generate on the source model (unpruned), or llama.cpp on its GGUF "
                        "conversion (--gguf), run alternately with ours (unpruned; needs the [peer] extra)")
    p.add_argument("--gguf", default=None, metavar="DIR",
                   help="--compare llama.cpp: the GGUF folder made by `python scripts/compare_llamacpp.py convert DIR --out GGUF_DIR`")
    p.add_argument("--peer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="--compare llama.cpp: override one of llama.cpp's defaults (n_batch=2048, n_ubatch=512, "
                        "kv_type=f16|f32, flash_attn=auto|on|off, vision_flash_attn=auto|on|off); repeatable")
    p.add_argument("--budget", default=None, choices=BUDGETS, help="LLaVA-NeXT: how each K is split over the crops (default: the export's)")
    p.add_argument("--selector", default=None,
                   help="comma-separated selectors timed side by side at each budget, switched at run time "
                        "(default: the export's); in-LLM ones (fastv, pdrop) prune at the export's --cuts, "
                        "and a budget is then the visual tokens kept on average over the decoder's layers")
    p.add_argument("--backend", default="ort", choices=BACKENDS, help="inference backend (default: ort)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines on stderr")
    return p


def _bench(argv) -> int:
    args = bench_parser().parse_args(argv)
    from .bench import format_table, parse_keeps, run_benchmark, write_csv, write_json, write_plot
    from .bench.report import check_writable, require_matplotlib
    from .errors import InputError

    keeps = parse_keeps(args.keep) if args.keep is not None else None
    if (args.gguf is not None or args.peer_option) and args.compare != "llama.cpp":
        raise InputError("--gguf and --peer-option go with --compare llama.cpp")
    peer_options = _peer_options(args.peer_option)
    for path in (args.json, args.csv, args.plot):  # fail before minutes of benchmarking, not after
        if path is not None:
            check_writable(path)
    if args.plot is not None:
        require_matplotlib()
    log = None if args.quiet else (lambda msg: print(f"tops-bench: {msg}", file=sys.stderr, flush=True))
    report = run_benchmark(
        args.dir, keeps=keeps, runs=args.runs, warmup=args.warmup, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, image=args.image, compare=args.compare, backend=args.backend, log=log,
        budget=args.budget, progress=not args.quiet and sys.stderr.isatty(),
        selectors=[x.strip() for x in args.selector.split(",") if x.strip()] if args.selector else None,
        gguf=args.gguf, peer_options=peer_options,
    )
    print(format_table(report))
    for path, write in ((args.json, write_json), (args.csv, write_csv), (args.plot, write_plot)):
        if path is not None:
            write(report, path)
            if log:
                log(f"wrote {path}")
    return 0


def _peer_options(items) -> dict:
    """["n_ubatch=1024", "kv_type=f32"] -> {"n_ubatch": 1024, "kv_type": "f32"} (checked by the peer module)."""
    from .errors import InputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--peer-option takes KEY=VALUE, got {item!r}")
        value = value.strip()
        out[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return out


def bench_main(argv=None) -> int:
    return _run_cli("tops-bench", _bench, argv)


# --- tops-eval -----------------------------------------------------------------------------
def eval_parser() -> argparse.ArgumentParser:
    from . import selector
    from .eval.shapes import QUESTION_TYPES
    from .eval.shapes_dense import QUESTION_TYPES as DENSE_TYPES
    from .runtime import BACKENDS
    from .runtime.layout import BUDGETS

    pruning = [m for m in selector.available() if selector.get(m).prunes]
    p = _Parser(
        prog="tops-eval",
        description="Accuracy of an exported model per selector and visual-token budget, through the ONNX pipeline: "
                    "a table (absolute and relative to unpruned, per question type, 95%% intervals in the JSON), "
                    "agreement with the unpruned model (top-1 and mean KL of the first answer token), the first "
                    "selector against each other one on the same items, JSON and a PNG of relative accuracy "
                    "against kept tokens.",
    )
    p.add_argument("dir", help="a tops-export output directory")
    p.add_argument("--task", default="shapesvqa",
                   help="shapesvqa, shapesvqa-dense (crowded scenes) or shapesvqa-wide (crowded 672x336 and 336x672 "
                        "scenes, for LLaVA-NeXT), built in (--split picks test or val), or a JSONL file (see "
                        "docs/fidelity.md)")
    p.add_argument("--keep", default="192,128,64", help="comma-separated budgets (default: 192,128,64); unpruned always runs")
    p.add_argument("--selector", default=None,
                   help=f"comma-separated selectors, switched at run time without re-export (default: the export's); "
                        f"any of {', '.join(pruning)}, each optionally with parameters as name:key=value[:key=value] "
                        f"(e.g. tops:relevance=0 or tops:stages=1 for the paper's ablations, dpp-merge:beta=0; merge=none|mean "
                        f"sets that row's token merging)")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="ShapesVQA split: test (default; report these) or val (tune selector parameters on it)")
    p.add_argument("--positions", default=None, choices=("compact", "original"),
                   help="position ids of the kept visual tokens for this run (default: the export's)")
    p.add_argument("--merge", default=None, choices=("mean", "none"),
                   help="token merging for every row that does not set merge=... (default: the export's for its own "
                        "method, each other method's own: none for tops, mean for dpp-merge)")
    p.add_argument("--limit", type=int, default=None, help="items to evaluate (ShapesVQA default: 1000; JSONL: all)")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="skip the first N items (default: 0): fresh ShapesVQA questions, or one shard of a long run")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="worker processes, each answering a contiguous share of the items with cores/N ONNX Runtime "
                        "threads (default: 1); the report is the one a single process writes")
    p.add_argument("--types", default=None, help=f"question types to ask (default: all; shapesvqa: {', '.join(QUESTION_TYPES)}; "
                                                 f"shapesvqa-dense and shapesvqa-wide: {', '.join(DENSE_TYPES)})")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default: 8)")
    p.add_argument("--budget", default=None, choices=BUDGETS, help="LLaVA-NeXT: how K is split over the crops (default: the export's)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report (schema: tops_edge/eval/report.py)")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG of relative accuracy against kept tokens")
    p.add_argument("--gallery", default=None, metavar="DIR",
                   help="write, for the first items, one PNG per item and budget with each selector's kept patches side by side")
    p.add_argument("--gallery-items", type=int, default=4, metavar="N", help="items in the gallery (default: 4)")
    p.add_argument("--backend", default="ort", choices=BACKENDS, help="inference backend (default: ort)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _eval(argv) -> int:
    args = eval_parser().parse_args(argv)
    from .bench import parse_keeps
    from .bench.report import check_writable, require_matplotlib
    from .eval import format_table, run_eval, write_json, write_plot

    for path in (args.json, args.plot):
        if path is not None:
            check_writable(path)
    if args.plot is not None:
        require_matplotlib()
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None  # noqa: E731
    log = None if args.quiet else (lambda msg: print(f"tops-eval: {msg}", file=sys.stderr, flush=True))
    report = run_eval(
        args.dir, task=args.task, keeps=parse_keeps(args.keep), selectors=split(args.selector), limit=args.limit,
        max_new_tokens=args.max_new_tokens, budget=args.budget, types=split(args.types), backend=args.backend,
        log=log, progress=not args.quiet and sys.stderr.isatty(), positions=args.positions,
        split=args.split, merge=args.merge, skip=args.skip, gallery=args.gallery, gallery_items=args.gallery_items,
        jobs=args.jobs,
    )
    print(format_table(report))
    for path, write in ((args.json, write_json), (args.plot, write_plot)):
        if path is not None:
            write(report, path)
            if log:
                log(f"wrote {path}")
    return 0


def eval_main(argv=None) -> int:
    return _run_cli("tops-eval", _eval, argv)


# --- tops-build ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .engines.build import BUILD_PRECISIONS
    from .plan import PRESETS

    p = _Parser(prog="tops-build", description="Build TensorRT engines for one device from a tops-export directory "
                                               "(run it on the device: engines are not portable).")
    p.add_argument("dir", help="a tops-export output directory (use --target trt for the selector plugin)")
    p.add_argument("--device", required=True, choices=tuple(PRESETS), help="device preset: memory plan, workspace, max context, optimization level")
    p.add_argument("--precision", default="fp16", choices=BUILD_PRECISIONS, help="fp16, or int8 from the export's Q/DQ graphs (default: fp16)")
    p.add_argument("--timing-cache", default=None, metavar="FILE", help="TensorRT timing cache, read and updated (default: DIR/timing.cache)")
    p.add_argument("--dry-run", action="store_true", help="print the memory plan and the optimization profiles; build nothing")
    p.add_argument("--quiet", action="store_true", help="no progress lines (one per engine) on stderr")
    return p


def _build(argv) -> int:
    args = build_parser().parse_args(argv)
    from .engines.build import build_engines, describe_build

    if args.dry_run:
        print(describe_build(args.dir, args.device, args.precision))
        return 0
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"tops-build: {msg}", file=sys.stderr, flush=True))  # noqa: E731
    build_engines(args.dir, args.device, args.precision, timing_cache=args.timing_cache, log=log,
                  warn=lambda msg: print(f"tops-build: {msg}", file=sys.stderr, flush=True))
    return 0


def build_main(argv=None) -> int:
    return _run_cli("tops-build", _build, argv)


# --- tops-serve ----------------------------------------------------------------------------
def serve_parser() -> argparse.ArgumentParser:
    from .runtime import BACKENDS

    p = _Parser(prog="tops-serve",
                description="Serve an export over an OpenAI-compatible HTTP API: POST /v1/chat/completions (JSON or "
                            "server-sent events), GET /v1/models, GET /health, GET /metrics (see docs/serve.md).")
    p.add_argument("dir", help="a tops-export output directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface, "
                        "then set --api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0: any free port)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' to /v1/* (default: $TOPS_SERVE_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=8, metavar="N",
                   help="requests that may wait for the model; one more is answered 429 with Retry-After (default: 8)")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="S",
                   help="seconds from a request's arrival to the end of its answer, queueing included; then it ends "
                        "with a timeout error (default: 120; 0: no limit)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="accept file:// image URLs under DIR (default: refused)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s) image URLs (32 MiB and 10 s at most; default: refused, send data: URIs)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="P",
                   help="refuse (413) an image of more than P pixels, checked before it is decoded (default: 16777216)")
    p.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                   help="new tokens for a request that sets no max_tokens (default: 256)")
    p.add_argument("--backend", default="ort", choices=BACKENDS, help="inference backend (default: ort)")
    p.add_argument("--quiet", action="store_true", help="no startup line and no access log on stderr")
    return p


def _serve(argv) -> int:
    args = serve_parser().parse_args(argv)
    from pathlib import Path

    from .errors import InputError, check_count
    from .serve import MediaPolicy, serve

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    check_count("--max-queue", args.max_queue, 1)
    check_count("--max-image-pixels", args.max_image_pixels, 1)
    check_count("--default-max-tokens", args.default_max_tokens, 1)
    if not args.request_timeout >= 0:
        raise InputError(f"--request-timeout must be >= 0 seconds, got {args.request_timeout}")
    local = None
    if args.allowed_local_media_path is not None:
        local = Path(args.allowed_local_media_path)
        if not local.is_dir():
            raise InputError(f"--allowed-local-media-path {local} is not a directory")
    api_key = args.api_key if args.api_key is not None else os.environ.get("TOPS_SERVE_API_KEY") or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1") and not args.quiet:
        print(f"tops-serve: warning: listening on {args.host} without --api-key: anyone who reaches the port can use "
              "the model", file=sys.stderr)
    serve(args.dir, host=args.host, port=args.port, backend=args.backend, quiet=args.quiet, api_key=api_key,
          max_queue=args.max_queue, request_timeout=args.request_timeout or None,
          default_max_tokens=args.default_max_tokens,
          media=MediaPolicy(allowed_local_path=local, allow_remote=args.allow_remote_media,
                            max_image_pixels=args.max_image_pixels))
    return 0


def serve_main(argv=None) -> int:
    return _run_cli("tops-serve", _serve, argv)


if __name__ == "__main__":  # python -m tops_edge.cli export|run|bench|eval|build|serve ...
    cmd, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    commands = {"export": export_main, "run": run_main, "bench": bench_main, "eval": eval_main, "build": build_main,
                "serve": serve_main}
    sys.exit(commands.get(cmd, lambda _: print("usage: python -m tops_edge.cli export|run|bench|eval|build|serve ...") or 2)(rest))
