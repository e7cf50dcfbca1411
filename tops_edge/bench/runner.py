"""`run_benchmark`: time `Pipeline.generate` per visual-token budget, optionally against HF `generate`
or llama.cpp (run alternately with ours, see bench/llamacpp.py); the limits beside the figures in
bench/limits.py."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import InputError, TopsError, check_count
from . import limits as lim
from .device import PeakMemory, device_info
from .stats import STAGES, aggregate, summary, timed_calls

COMPARE = ("hf", "llama.cpp")

DEFAULT_BUDGETS = (576, 192, 128, 64)
SENTENCE = "Look at the picture carefully and describe the objects, their colours, shapes and positions. "


class BenchReport(dict):
    """The benchmark result: a plain dict with the layout of `report.SCHEMA` (so `json.dump` works),
    with attribute access to its top-level keys for convenience (`report.budgets`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def parse_keeps(text: str) -> list[int]:
    """"576,192,64" -> [576, 192, 64] (duplicates dropped, order kept); anything else is an InputError."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise InputError(f"--keep must be a comma-separated list of whole numbers, got {text!r}")
    keeps: list[int] = []
    for p in parts:
        try:
            k = int(p)
        except ValueError:
            where = f" in {text!r}" if len(parts) > 1 else ""
            raise InputError(f"--keep must be a comma-separated list of whole numbers, got {p!r}{where}") from None
        if k < 1:
            raise InputError(f"--keep {k} is out of range: a budget keeps at least 1 visual token")
        if k not in keeps:
            keeps.append(k)
    return keeps


def default_keeps(num_tokens: int, has_selector: bool) -> list[int]:
    """All N tokens, then the usual budgets below N (only N for an export without a selector)."""
    return [num_tokens] + ([k for k in DEFAULT_BUDGETS if k < num_tokens] if has_selector else [])


def build_prompt(tokenizer, length: int) -> tuple[str, int]:
    """A question of about `length` text tokens (a sentence repeated, trimmed with the tokenizer).
    Returns (text, its token count when tokenized on its own)."""
    check_count("--prompt-len", length, 1)
    sentence_ids = tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
    reps = length // max(len(sentence_ids), 1) + 1
    ids = tokenizer(SENTENCE * reps, add_special_tokens=False)["input_ids"][:length]
    text = tokenizer.decode(ids, skip_special_tokens=True).strip() or "Describe the image."
    return text, len(tokenizer(text, add_special_tokens=False)["input_ids"])


def synthetic_image(size: int = 336):
    """A deterministic smooth test scene, used when no --image is given."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(x / 23.0), 127 + 100 * np.cos(y / 31.0), 127 + 100 * np.sin((x + y) / 41.0)], -1)
    img[(x - size * 0.3) ** 2 + (y - size * 0.6) ** 2 < (size * 0.15) ** 2] = (220, 30, 30)
    img[int(size * 0.2): int(size * 0.45), int(size * 0.55): int(size * 0.85)] = (30, 60, 220)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def run_benchmark(directory, keeps=None, runs: int = 5, warmup: int = 1, prompt_len: int = 32,
                  new_tokens: int = 32, image=None, compare: str | None = None, backend: str = "ort",
                  log=None, budget: str | None = None, progress: bool = False, selectors=None, gguf=None,
                  peer_options: dict | None = None) -> BenchReport:
    """Benchmark an export directory at each visual-token budget in `keeps` (default: N, then
    192/128/64 below N). Each budget runs `warmup` untimed and `runs` timed greedy generations of
    `new_tokens` tokens (EOS ignored, as HF's side uses min_new_tokens; the counts are reported) on the same
    image and prompt. `compare="hf"` also times the HF model the export came from (unpruned).
    `budget` splits each budget over a LLaVA-NeXT image's crops (default: the export's).
    `log(str)` receives progress lines; `progress` shows a bar over all the runs (on a terminal).
    `selectors` (names or specs such as `pdrop:layers=2,8,16`, switched at run time as tops-eval
    does) time several methods side by side at each budget, which is then the equivalent average
    T of each method's plan: before the LLM at K = T, or inside it at the export's cuts.
    `compare="llama.cpp"` runs llama.cpp on the GGUFs in `gguf` (scripts/compare_llamacpp.py
    convert) alternately with ours, run for run, unpruned, on the same image and prompt token ids;
    `peer_options` overrides llama.cpp's defaults (llamacpp.DEFAULT_OPTIONS). Every report has the
    limits (bench/limits.py): the FLOP-limit prefill ratio and the weight-read TPOT limit per budget.
    Returns a BenchReport (see report.SCHEMA)."""
    from ..runtime import Pipeline
    from ..runtime.preprocess import load_image

    runs = check_count("--runs", runs, 1)
    warmup = check_count("--warmup", warmup, 0)
    new_tokens = check_count("--new-tokens", new_tokens, 1)
    if compare not in (None, *COMPARE):
        raise InputError(f"--compare must be one of {', '.join(COMPARE)}, got {compare!r}")
    peer_spec = None
    if compare == "llama.cpp":  # everything about the peer checked before minutes of benchmarking
        from . import llamacpp

        llamacpp.require_llama_cpp()
        peer_options = llamacpp.check_options(peer_options)
        peer_spec = llamacpp.load_peer_files(gguf)
    log = log or (lambda msg: None)
    if not Path(directory).is_dir():
        raise InputError(f"{directory} is not a directory; pass the --out DIR of tops-export")
    pipe = Pipeline.load(directory, backend=backend)
    budget = pipe.resolve_budget(budget)
    picture = load_image(synthetic_image() if image is None else image)
    n, total = pipe.visual_tokens(picture)  # LLaVA-NeXT: the count depends on the image's size
    keeps = default_keeps(n, pipe.selector is not None) if keeps is None else list(keeps)
    if not keeps:
        raise InputError("--keep needs at least one budget")
    keeps = [pipe.resolve_keep(k, n) for k in keeps]  # all checked before anything runs
    prompt, prompt_text_tokens = build_prompt(pipe.pre.tokenizer, check_count("--prompt-len", prompt_len, 1))
    from ..eval.runner import parse_selector_spec

    selectors = list(selectors or [pipe.selector_method])
    specs = {spec: parse_selector_spec(spec) for spec in selectors}
    exported = (pipe.selector_method, pipe.merge)
    for spec in selectors:  # every plan checked before anything runs
        _use(pipe, specs[spec], exported)
        for k in keeps:
            pipe.plan(k, n)
    if peer_spec is not None:
        if peer_spec.get("config_sha256") != pipe.manifest["model"].get("config_sha256") or pipe.layout.name != "single":
            raise InputError(f"{peer_spec['dir']} was converted from another model than this export "
                             f"({peer_spec.get('source')}); run scripts/compare_llamacpp.py convert on it")

    report = BenchReport(
        schema="tops-bench/3",
        created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        directory=str(Path(directory).resolve()),
        settings={
            "keeps": keeps, "runs": runs, "warmup": warmup, "prompt_len": int(prompt_len),
            "prompt_text_tokens": prompt_text_tokens, "new_tokens": new_tokens,
            "image": "synthetic 336x336" if image is None else str(image), "compare": compare, "budget": budget,
            "selectors": selectors, "cuts": list(pipe.cuts), "gguf": None if peer_spec is None else peer_spec["dir"],
        },
        device=dict(device_info(pipe), num_visual_tokens=n, num_visual_tokens_total=total),
        budgets=[],
        hf=None,
        limits=None,
        peer=None,
    )
    from tqdm.auto import tqdm

    calls = (len(keeps) * len(selectors) * (1 + (peer_spec is not None)) + (compare == "hf")) * (warmup + runs)
    bar = tqdm(total=calls, desc="tops-bench", unit="run", disable=not progress, leave=False)
    peer = None
    try:
        if peer_spec is not None:
            peer, before, after = _start_peer(pipe, peer_spec, peer_options, picture, prompt, n, new_tokens, log)
        for keep in keeps:  # the methods side by side at each budget: neighbours in time on a noisy host
            for spec in selectors:
                _use(pipe, specs[spec], exported)
                log(f"{spec} keep {keep}/{n}: {warmup} warmup + {runs} timed runs"
                    + (", alternating with llama.cpp's" if peer else ""))
                bar.set_postfix_str(f"{spec} T={keep}")
                call = functools.partial(pipe.generate, picture, prompt, max_new_tokens=new_tokens, keep=keep,
                                         ignore_eos=True, budget=budget)
                peer_samples = None
                with PeakMemory() as mem:
                    if peer is None:
                        samples = timed_calls(call, warmup, runs, done=bar.update)
                    else:
                        peer_call = functools.partial(peer.generate, before, after, new_tokens)
                        samples, peer_samples = alternate(call, peer_call, warmup, runs, done=bar.update)
                entry = {"keep": keep, "selector": spec, **aggregate(samples), "peak_rss_bytes": mem.rss_bytes,
                         "gpu_peak_bytes": mem.gpu_bytes, "hf_e2e_ratio": None,
                         "select_share_pct": summary(_select_share(r) for r, _ in samples), "limits": None,
                         "peer": None if peer_samples is None else peer_entry(samples, peer_samples)}
                report["budgets"].append(entry)
        if compare == "hf":
            bar.set_postfix_str("HF")
            report["hf"] = hf_benchmark(pipe.manifest, picture, prompt, new_tokens, warmup, runs, log, bar.update)
        if peer is not None:
            bar.set_postfix_str("llama.cpp parity")
            report["peer"] = peer_summary(pipe, peer, peer_spec, picture, prompt, before, after, new_tokens, report)
    finally:
        bar.close()
        if peer is not None:
            peer.close()
    if compare == "hf":
        hf_median = report["hf"]["e2e_ms"]["median"]
        for entry in report["budgets"]:
            entry["hf_e2e_ratio"] = round(entry["e2e_ms"]["median"] / hf_median, 4) if hf_median > 0 else None
    log("measuring the memory bandwidth (numpy copy)")
    add_limits(report, pipe, n, lim.memory_bandwidth())
    return report


def _select_share(result) -> float:
    """The selector's share of one run's TTFT, in %."""
    ttft = sum(result.timings_ms.get(s, 0.0) for s in STAGES)
    return 100.0 * result.timings_ms.get("select", 0.0) / ttft if ttft > 0 else 0.0


# --- the llama.cpp peer ----------------------------------------------------------------------
def alternate(ours, theirs, warmup: int, runs: int, clock=time.perf_counter, done=lambda: None):
    """`warmup` untimed then `runs` timed pairs of one call of ours and one of the peer's, who goes
    first alternating from pair to pair (so neither always runs on the other's warm caches or cold
    cores). Returns ([(our result, wall ms)], [peer result]) of the timed pairs; the peer times itself."""
    samples, peer_samples = [], []
    for i in range(warmup + runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        out = [None, None]
        for who in order:
            if who == 0:
                t0 = clock()
                result = ours()
                out[0] = (result, (clock() - t0) * 1e3)
            else:
                out[1] = theirs()
            done()
        if i >= warmup:
            samples.append(out[0])
            peer_samples.append(out[1])
    return samples, peer_samples


PEER_STAGES = ("preprocess", "vision", "prefill")


def _peer_ttft(p) -> float:
    return sum(p["timings_ms"][s] for s in PEER_STAGES)


def peer_entry(samples, peer_samples) -> dict:
    """The peer's runs beside one budget's, and ours / the peer's per pair of runs (below 1: ours faster)."""
    t = lambda p, s: p["timings_ms"][s]  # noqa: E731
    steps = [len(p["token_ids"]) - 1 for p in peer_samples]
    out = {f"{s}_ms": summary(t(p, s) for p in peer_samples) for s in PEER_STAGES}
    out["ttft_ms"] = summary(_peer_ttft(p) for p in peer_samples)
    out["tpot_ms"] = summary(t(p, "decode_per_token") for p in peer_samples) if min(steps) > 0 else None
    out["e2e_ms"] = summary(p["e2e_ms"] for p in peer_samples)
    out["generated_tokens"] = [len(p["token_ids"]) for p in peer_samples]
    out["prompt_tokens"] = int(peer_samples[0]["prompt_tokens"])
    out["prefill_gflop_s"], out["tpot_vs_limit"] = None, None  # filled with the limits

    def per_pair(ours_value, theirs_value):
        pairs = [(ours_value(r, ms), theirs_value(p)) for (r, ms), p in zip(samples, peer_samples)]
        pairs = [a / b for a, b in pairs if b > 0]
        return summary(pairs) if pairs else None

    ttft = lambda r, ms: sum(r.timings_ms.get(s, 0.0) for s in STAGES)  # noqa: E731
    out["ratios"] = {
        "vision": per_pair(lambda r, ms: r.timings_ms.get("vision", 0.0), lambda p: t(p, "vision")),
        "prefill": per_pair(lambda r, ms: r.timings_ms.get("prefill", 0.0), lambda p: t(p, "prefill")),
        "ttft": per_pair(ttft, _peer_ttft),
        "tpot": per_pair(lambda r, ms: r.timings_ms.get("decode_per_token", 0.0), lambda p: t(p, "decode_per_token")),
        "e2e": per_pair(lambda r, ms: ms, lambda p: p["e2e_ms"]),
    }
    return out


def _start_peer(pipe, spec, options, picture, prompt, n, new_tokens, log):
    from .llamacpp import PeerProcess

    before, after = pipe.pre.split_ids(pipe.pre.prompt_text(prompt))
    threads = int(getattr(getattr(pipe.backend, "options", None), "intra_op_num_threads", 0) or 0) \
        or int(os.cpu_count() or 1)  # ours: ORT's intra-op threads (0 = its default, one per core)
    log(f"llama.cpp: loading {spec['dir']} ({threads} threads)")
    peer = PeerProcess(spec, threads=threads, n_ctx=len(before) + n + len(after) + new_tokens + 8, options=options)
    peer.set_image(picture)
    return peer, before, after


def peer_summary(pipe, peer, spec, picture, prompt, before, after, new_tokens, report) -> dict:
    """The peer's settings, peak RSS and parity with ours (untimed, after the timed runs): the image
    embeddings' max |difference|, and the greedy tokens equal to ours unpruned, from llama.cpp's whole
    path and from its decoder fed our embeddings."""
    info = peer.info
    pixels, size = pipe.pre.image_inputs(picture)
    token_map = pipe.layout.token_map(size)
    ours_features = pipe.vision.run(pipe.layout.vision_feeds(pixels, size, token_map))["image_features"][0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "embd.npy")
        theirs = peer.generate(before, after, new_tokens, embd_out=path)
        theirs_features = np.load(path)
    diff = float(np.abs(theirs_features - ours_features).max()) if theirs_features.shape == ours_features.shape else None
    unpruned = [b for b in report["budgets"] if not b["stages"]]
    ours_tokens = None
    if unpruned:
        ours_tokens = pipe.generate(picture, prompt, max_new_tokens=new_tokens, keep=unpruned[0]["keep"],
                                    ignore_eos=True).token_ids
    decoder_tokens = peer.generate_from_features(before, after, ours_features, new_tokens)
    same = (lambda a: sum(x == y for x, y in zip(ours_tokens, a))) if ours_tokens else (lambda a: None)
    return {
        "runtime": "llama.cpp", "version": info["llama_cpp_python"], "gguf": spec["dir"], "text": spec["text"],
        "text_type": spec.get("text_type", "f32"), "mmproj": spec["mmproj"], "mtmd_lib": info["mtmd_lib"],
        "workarounds": list(spec.get("workarounds", [])), "threads": info["threads"], "n_batch": info["n_batch"],
        "n_ubatch": info["n_ubatch"], "kv_type": info["kv_type"], "flash_attn": info["flash_attn"],
        "vision_flash_attn": info["vision_flash_attn"],
        "weight_bytes": info["model_bytes"], "tpot_limit_ms": None, "prompt_tokens": int(theirs["prompt_tokens"]),
        "peak_rss_bytes": peer.peak_rss_bytes(), "system_info": info["system_info"],
        "parity": {"image_embd_max_abs_diff": diff, "image_embd_max_abs": float(np.abs(ours_features).max()),
                   "tokens_equal": same(theirs["token_ids"]),
                   "decoder_tokens_equal": same(decoder_tokens), "new_tokens": new_tokens},
    }


# --- the limits ------------------------------------------------------------------------------
def add_limits(report, pipe, n: int, bandwidth) -> None:
    """Fill report["limits"] and each budget's "limits" (see bench/limits.py)."""
    try:
        shape = lim.DecoderShape.from_manifest(pipe.manifest)
    except (KeyError, ValueError):
        return  # an export without the decoder's shape recorded: no limits
    weight_bytes = lim.decoder_weight_bytes(pipe.manifest)
    tpot_limit = lim.decode_limit_ms(weight_bytes, bandwidth.bytes_per_s)
    extra = report["settings"]["new_tokens"] - 1
    segment_layers = list(pipe.segment_layers)
    report["limits"] = {
        "memory_bandwidth_gb_s": round(bandwidth.gb_s, 3), "bandwidth_method": bandwidth.method,
        "decoder_weight_bytes": weight_bytes, "tpot_limit_ms": round(tpot_limit, 4),
        "decoder": {k: int(v) for k, v in vars(shape).items()},
    }
    if report.get("peer"):
        report["peer"]["tpot_limit_ms"] = round(lim.decode_limit_ms(report["peer"]["weight_bytes"], bandwidth.bytes_per_s), 4)
    unpruned = {}
    for b in report["budgets"]:
        if not b["stages"]:
            unpruned.setdefault(b["selector"], b)
    for b in report["budgets"]:
        segs = lim.segment_tokens(segment_layers, b["stages"], b["prompt_tokens"], n)
        full = lim.segment_tokens(segment_layers, [], lim.other_tokens(b["stages"], b["prompt_tokens"], n) + n, n)
        flops, flops0 = lim.prefill_flops(shape, segs), lim.prefill_flops(shape, full)
        ref = unpruned.get(b["selector"]) or next(iter(unpruned.values()), None)
        measured = lim.ratio(b["prefill_ms"]["median"], ref["prefill_ms"]["median"]) if ref else None
        flop_ratio = lim.ratio(flops, flops0)
        b["limits"] = {
            "prefill_flops": flops, "prefill_flops_dense": lim.prefill_flops(shape, segs, "dense", extra),
            "unpruned_prefill_flops": flops0, "flop_ratio": flop_ratio, "prefill_ratio": measured,
            "prefill_vs_limit": lim.ratio(measured, flop_ratio),
            "prefill_gflop_s": _gflop_s(flops, b["prefill_ms"]["median"]),
            "tpot_limit_ms": round(tpot_limit, 4),
            "tpot_vs_limit": lim.ratio(b["tpot_ms"]["median"], tpot_limit) if b["tpot_ms"] else None,
        }
        if b.get("peer"):  # llama.cpp's prefill is always the unpruned one
            b["peer"]["prefill_gflop_s"] = _gflop_s(flops0, b["peer"]["prefill_ms"]["median"])
            b["peer"]["tpot_vs_limit"] = lim.ratio((b["peer"]["tpot_ms"] or {}).get("median"),
                                                   (report.get("peer") or {}).get("tpot_limit_ms"))


def _gflop_s(flops: int, ms: float) -> float | None:
    return round(flops / (ms * 1e6), 3) if ms > 0 else None


def _use(pipe, spec, exported: tuple[str, str] | None = None) -> None:
    """Switch to a parsed selector spec; its `merge=` (if any) sets the runtime's token merging, else
    the export's for the export's own method (`exported`: its method and merge), else the method's
    own default (as tops-eval does)."""
    from .. import selector as selector_registry

    name, params = spec
    params = dict(params)
    if "merge" in params:
        pipe.merge = params.pop("merge")
    elif exported is not None:
        pipe.merge = exported[1] if name == exported[0] else selector_registry.get(name).merge
    pipe.use_selector(name, **params)


def hf_benchmark(manifest: dict, image, prompt: str, new_tokens: int, warmup: int, runs: int, log,
                 done=lambda: None) -> dict:
    """HF `LlavaForConditionalGeneration.generate` (eager attention, greedy, exactly `new_tokens` new
    tokens) on the same image and prompt; timed from the processor call to the last token."""
    import torch

    from ..models import load

    source = manifest["model"]["source"]
    log(f"hf: loading {source}")
    try:
        adapter = load(source)
    except TopsError as exc:
        raise type(exc)(f"--compare hf: {exc}") from None
    model, processor = adapter.model.eval(), adapter.processor
    attn = "eager"
    try:
        model.set_attn_implementation("eager")
    except Exception:
        attn = str(getattr(model.config, "_attn_implementation", "default"))
    try:
        from ..models.base import config_sha256

        same_config = config_sha256(model.config) == manifest["model"].get("config_sha256")
    except Exception:
        same_config = None
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.no_grad()
    def call():
        inputs = processor(images=image, text=text, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return out.shape[1] - inputs["input_ids"].shape[1]

    log(f"hf: {warmup} warmup + {runs} timed runs (unpruned)")
    with PeakMemory() as mem:
        samples = timed_calls(call, warmup, runs, clock=time.perf_counter, done=done)
    return {
        "model_source": str(source),
        "config_matches_export": same_config,
        "attn_implementation": attn,
        "torch_threads": int(torch.get_num_threads()),
        "e2e_ms": summary(ms for _, ms in samples),
        "generated_tokens": [int(n) for n, _ in samples],
        "peak_rss_bytes": mem.rss_bytes,
    }
