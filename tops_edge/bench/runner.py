"""`run_benchmark`: time `Pipeline.generate` per visual-token budget, optionally against HF `generate`."""

from __future__ import annotations

import datetime as _dt
import functools
import time
from pathlib import Path

import numpy as np

from ..errors import InputError, TopsError, check_count
from .device import PeakMemory, device_info
from .stats import aggregate, summary, timed_calls

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
                  log=None, budget: str | None = None, progress: bool = False, selectors=None) -> BenchReport:
    """Benchmark an export directory at each visual-token budget in `keeps` (default: N, then
    192/128/64 below N). Each budget runs `warmup` untimed and `runs` timed greedy generations of
    `new_tokens` tokens (EOS ignored, as HF's side uses min_new_tokens; the counts are reported) on the same
    image and prompt. `compare="hf"` also times the HF model the export came from (unpruned).
    `budget` splits each budget over a LLaVA-NeXT image's crops (default: the export's).
    `log(str)` receives progress lines; `progress` shows a bar over all the runs (on a terminal).
    `selectors` (names or specs such as `pdrop:layers=2,8,16`, switched at run time as tops-eval
    does) time several methods side by side at each budget, which is then the equivalent average
    T of each method's plan: before the LLM at K = T, or inside it at the export's cuts. Returns a
    BenchReport (see report.SCHEMA)."""
    from ..runtime import Pipeline
    from ..runtime.preprocess import load_image

    runs = check_count("--runs", runs, 1)
    warmup = check_count("--warmup", warmup, 0)
    new_tokens = check_count("--new-tokens", new_tokens, 1)
    if compare not in (None, "hf"):
        raise InputError(f"--compare must be 'hf', got {compare!r}")
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

    report = BenchReport(
        schema="tops-bench/2",
        created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        directory=str(Path(directory).resolve()),
        settings={
            "keeps": keeps, "runs": runs, "warmup": warmup, "prompt_len": int(prompt_len),
            "prompt_text_tokens": prompt_text_tokens, "new_tokens": new_tokens,
            "image": "synthetic 336x336" if image is None else str(image), "compare": compare, "budget": budget,
            "selectors": selectors, "cuts": list(pipe.cuts),
        },
        device=dict(device_info(pipe), num_visual_tokens=n, num_visual_tokens_total=total),
        budgets=[],
        hf=None,
    )
    from tqdm.auto import tqdm

    calls = (len(keeps) * len(selectors) + (compare == "hf")) * (warmup + runs)
    bar = tqdm(total=calls, desc="tops-bench", unit="run", disable=not progress, leave=False)
    try:
        for keep in keeps:  # the methods side by side at each budget: neighbours in time on a noisy host
            for spec in selectors:
                _use(pipe, specs[spec], exported)
                log(f"{spec} keep {keep}/{n}: {warmup} warmup + {runs} timed runs")
                bar.set_postfix_str(f"{spec} T={keep}")
                call = functools.partial(pipe.generate, picture, prompt, max_new_tokens=new_tokens, keep=keep,
                                         ignore_eos=True, budget=budget)
                with PeakMemory() as mem:
                    samples = timed_calls(call, warmup, runs, done=bar.update)
                entry = {"keep": keep, "selector": spec, **aggregate(samples), "peak_rss_bytes": mem.rss_bytes,
                         "gpu_peak_bytes": mem.gpu_bytes, "hf_e2e_ratio": None}
                report["budgets"].append(entry)
        if compare == "hf":
            bar.set_postfix_str("HF")
            report["hf"] = hf_benchmark(pipe.manifest, picture, prompt, new_tokens, warmup, runs, log, bar.update)
    finally:
        bar.close()
    if compare == "hf":
        hf_median = report["hf"]["e2e_ms"]["median"]
        for entry in report["budgets"]:
            entry["hf_e2e_ratio"] = round(entry["e2e_ms"]["median"] / hf_median, 4) if hf_median > 0 else None
    return report


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
