"""`tops-eval`: accuracy per selector and budget, through the exported ONNX pipeline.

Every item is answered once unpruned (all visual tokens; the selector is skipped, so this is the
same for every method) and once per (selector, budget). Relative accuracy is pruned / unpruned on
the same items; its 95% interval is a paired bootstrap over items, the absolute one a Wilson interval.

Agreement with the unpruned model is measured on the same runs, per item, on the distribution of the
first answer token (the whole answer for one-word answers): top-1 agreement (the same most likely
token) and KL(unpruned || pruned). Accuracy only moves when an answer flips; the KL also sees how far
a pruned sequence moved the model's belief, so it separates selectors whose accuracies tie.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from pathlib import Path

import numpy as np

from ..errors import InputError, check_count
from ..runtime.layout import POSITIONS
from ..runtime.kept_view import Stage
from .tasks import BUILTIN_TASKS, Item, load_task, score

SCHEMA = "tops-eval/1"
BOOTSTRAP = 1000
Z95 = 1.959964


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _resamples(n: int, seed: int) -> np.ndarray:
    """[BOOTSTRAP, n] item indices, drawn with replacement: the paired bootstrap's resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))


def mean_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean of `values` over items (zero width for no items)."""
    if len(values) == 0:
        return (0.0, 0.0)
    lo, hi = np.percentile(values[_resamples(len(values), seed)].mean(1), [2.5, 97.5])
    return (float(lo), float(hi))


def relative_interval(pruned: np.ndarray, full: np.ndarray, seed: int = 0) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of sum(pruned) / sum(full) over the same items; None if the
    unpruned model gets none right."""
    if full.sum() == 0:
        return None
    idx = _resamples(len(full), seed)
    f, p = full[idx].sum(1), pruned[idx].sum(1)
    ratios = p[f > 0] / f[f > 0]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return (float(lo), float(hi))


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar test on the discordant items (one selector right, the other wrong):
    the binomial probability, under "both are as good", of a split at least this uneven."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """a against b on the same items (1 = right): the accuracy difference a - b with its 95% paired
    bootstrap interval, the discordant counts (`wins`: a right and b wrong; `losses`: the reverse)
    and McNemar's exact p-value."""
    n = len(a)
    wins, losses = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    return {"diff": (wins - losses) / n if n else 0.0, "diff_ci95": list(mean_interval(a - b, seed)),
            "wins": wins, "losses": losses, "p_mcnemar": mcnemar_p(wins, losses)}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of logits [..., V]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row from log-probabilities [..., V] (P: the unpruned model's), in nats; >= 0."""
    reference, other = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    return np.maximum((np.exp(reference) * (reference - other)).sum(-1), 0.0)


def agreement_cell(kl: np.ndarray, top1: np.ndarray) -> dict:
    """One (selector, budget)'s agreement with the unpruned model: the share of items whose most
    likely first answer token is the unpruned one (Wilson interval) and the mean KL (bootstrap)."""
    n, same = len(top1), int(np.sum(top1))
    return {"n": n, "top1": same / n if n else 0.0, "top1_ci95": list(wilson(same, n)),
            "kl": float(np.mean(kl)) if n else 0.0, "kl_ci95": list(mean_interval(kl)),
            "kl_median": float(np.median(kl)) if n else 0.0}


def versus(runs: dict, reference: str, kls: dict | None = None) -> dict:
    """The first selector of a run against each other one, per budget, on all items:
    {other: {"<keep>": paired_difference(reference, other)}}; with per-item KLs (`kls`, keyed like
    `runs`) each entry also has `kl_diff` (the reference's mean KL minus the other's: below 0, the
    reference stays closer to the unpruned model) with its paired-bootstrap `kl_diff_ci95`, and the
    per-item view, which a few large KLs cannot dominate: `kl_lower` / `kl_higher`, the shares of
    items on which the reference's KL is the lower / the higher (equal ones in neither), and
    `p_sign`, the exact two-sided sign test on those counts."""
    out: dict = {}
    for (method, keep), correct in runs.items():
        if method != reference and (reference, keep) in runs:
            entry = paired_difference(runs[(reference, keep)], correct)
            if kls is not None and (reference, keep) in kls and (method, keep) in kls:
                entry.update(kl_comparison(kls[(reference, keep)], kls[(method, keep)]))
            out.setdefault(method, {})[str(keep)] = entry
    return out


def kl_comparison(reference: np.ndarray, other: np.ndarray, seed: int = 0) -> dict:
    """Per-item KLs of two selectors on the same items: the mean difference with its paired-bootstrap
    interval, the shares of items where the reference's is lower / higher, and the sign test's p."""
    diff = np.asarray(reference, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    n = len(diff)
    lower, higher = int((diff < 0).sum()), int((diff > 0).sum())
    return {"kl_diff": float(diff.mean()) if n else 0.0, "kl_diff_ci95": list(mean_interval(diff, seed)),
            "kl_lower": lower / n if n else 0.0, "kl_higher": higher / n if n else 0.0,
            "p_sign": mcnemar_p(lower, higher)}


def _cell(correct: np.ndarray, full: np.ndarray | None) -> dict:
    n, c = len(correct), int(correct.sum())
    cell = {"n": n, "correct": c, "accuracy": c / n if n else 0.0, "accuracy_ci95": list(wilson(c, n))}
    if full is not None:
        cell["relative"] = (c / full.sum()) if full.sum() else None
        ci = relative_interval(correct, full)
        cell["relative_ci95"] = list(ci) if ci else None
    return cell


def summarize(categories: list[str], full: np.ndarray, runs: dict) -> dict:
    """Tables from per-item correctness: `full` [items] unpruned, runs[(selector, keep)] [items]."""
    cats = sorted(set(categories), key=categories.index)
    masks = {c: np.array([x == c for x in categories]) for c in cats}
    table = {"unpruned": {"all": _cell(full, None), **{c: _cell(full[m], None) for c, m in masks.items()}}}
    for (method, keep), correct in runs.items():
        row = {"all": _cell(correct, full), **{c: _cell(correct[m], full[m]) for c, m in masks.items()}}
        table.setdefault(method, {})[str(keep)] = row
    return {"categories": cats, "table": table}


def parse_selector_spec(spec: str) -> tuple[str, dict]:
    """`name` or `name:key=value[:key=value...]` (e.g. `tops:relevance=0`, `dpp-merge:beta=0:relevance_sign=-1`) ->
    (name, params); names and parameters are checked against the selector registry."""
    from .. import selector as selector_registry

    from ..selector.merge import MERGES

    name, *pairs = [part.strip() for part in spec.split(":")]
    info = selector_registry.get(name)
    params = {}
    merge = None
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise InputError(f"selector '{spec}': parameters are key=value, got '{pair}'")
        key, value = key.strip().replace("-", "_"), value.strip()
        if key == "merge":  # not a selector parameter: the runtime's token merging for this row
            if value not in MERGES:
                raise InputError(f"selector '{spec}': merge is one of {', '.join(MERGES)}, got '{value}'")
            merge = value
            continue
        params[key] = value
    try:
        info.resolve_params(params)
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"selector '{spec}': {exc}") from None
    return name, (params if merge is None else dict(params, merge=merge))


def run_eval(directory, task: str = "shapesvqa", keeps=None, selectors=None, limit: int | None = None,
             max_new_tokens: int = 8, budget: str | None = None, types=None, backend: str = "ort",
             log=None, progress: bool = False, positions: str | None = None, split: str = "test",
             pipeline=None, merge: str | None = None, skip: int = 0, gallery=None, gallery_items: int = 4) -> dict:
    """Evaluate an export on `task` (`shapesvqa` or a JSONL path) for each selector and budget.
    `selectors` are names or specs with parameters (`tops:stages=1`, see parse_selector_spec); each spec
    is a row of the report under its own text; `merge=none|mean` in a spec sets that row's token
    merging (e.g. `dpp-merge:merge=none`). `positions` overrides the export's position convention
    (`compact` or `original`) for this run; `merge` sets the token merging of every row that does
    not set its own (default: the export's for the export's own method, each other method's own
    default, e.g. none for tops and mean for dpp-merge). `skip` drops the task's first items (then `limit` counts from there). `gallery`, a
    folder, receives one PNG per item and pruned budget for the first `gallery_items` items: each
    selector's kept patches side by side (runtime/kept_view.py). Returns the report (schema
    `tops-eval/1`, see report.py)."""
    from tqdm.auto import tqdm

    from .. import selector as selector_registry
    from ..runtime import Pipeline
    from ..selector.merge import MERGES

    log = log or (lambda msg: None)
    if not Path(directory).is_dir():
        raise InputError(f"{directory} is not a directory; pass the --out DIR of tops-export")
    selectors = list(selectors or [])
    specs = {spec: parse_selector_spec(spec) for spec in selectors}
    for spec, (name, _) in specs.items():
        if not selector_registry.get(name).prunes:
            raise InputError(f"selector '{name}' does not prune; the unpruned run is always included")
    if positions is not None and positions not in POSITIONS:
        raise InputError(f"positions must be one of {', '.join(POSITIONS)}, got '{positions}'")
    # a caller's own Pipeline on this export (e.g. with other session options); else one on `backend`
    pipe = pipeline if pipeline is not None else Pipeline.load(directory, backend=backend)
    budget = pipe.resolve_budget(budget)
    if positions is not None:
        pipe.positions = positions
    if merge is not None and merge not in MERGES:
        raise InputError(f"merge must be one of {', '.join(MERGES)}, got '{merge}'")
    exported = (pipe.selector_method, pipe.merge)
    if not selectors:
        selectors = [pipe.selector_method]
        specs = {pipe.selector_method: (pipe.selector_method, {})}
    keeps = sorted({int(k) for k in (keeps or [])}, reverse=True)
    if not keeps:
        raise InputError("--keep needs at least one budget")
    for k in keeps:
        selector_registry.check_keep(k, pipe.max_selectable)
    if gallery is not None:
        gallery = _gallery_folder(gallery)
        gallery_items = check_count("--gallery-items", gallery_items, 1)
    items = load_task(task, limit=limit, types=types, split=split, skip=skip)
    log(f"{len(items)} items, selectors {', '.join(selectors)}, keeps {', '.join(map(str, keeps))}")
    t0 = time.perf_counter()
    total = len(items) * (1 + len(selectors) * len(keeps))
    bar = tqdm(total=total, desc="tops-eval", unit="answer", disable=not progress, leave=False)
    answers: dict = {}
    # [items, V] float32 log-probabilities of the unpruned first answer token, held for the whole run
    # (items x vocabulary x 4 bytes: 128 MB for 1000 items on a 32k vocabulary)
    full_logprobs = None
    kls: dict = {}  # (method, keep): per-item KL(unpruned || pruned) of that token's distribution
    top1s: dict = {}  # (method, keep): per-item 1 where the most likely first token is the unpruned one
    stages: dict = {}  # (item, keep): [(method, prediction, Stage)] for the gallery

    def answer_all(key, keep):
        nonlocal full_logprobs
        preds, logprobs = [], []
        for i, item in enumerate(items):
            n = pipe.visual_tokens(item.image)[0] if pipe.layout.name != "single" else pipe.max_selectable
            k = n if keep is None else min(keep, n)  # None: every visual token
            r = pipe.generate(item.image, item.prompt, max_new_tokens=max_new_tokens, keep=k, budget=budget,
                              output_logits=True)
            preds.append(r.text.strip())
            if gallery is not None and i < gallery_items and keep is not None:
                stages.setdefault((i, keep), []).append((key[0], preds[-1], Stage.of(r, f"{key[0]}, K={k}")))
            logprobs.append(log_softmax(r.logits[0]).astype(np.float32))
            bar.update()
        answers[key] = preds
        logprobs = np.stack(logprobs) if logprobs else np.zeros((0, 1), np.float32)
        if keep is None:
            full_logprobs = logprobs
        else:
            kls[key] = kl_divergence(full_logprobs, logprobs)
            top1s[key] = (logprobs.argmax(-1) == full_logprobs.argmax(-1)).astype(np.int64)
        return np.array([score(item, p) for item, p in zip(items, preds)], dtype=np.int64)

    full_keep = pipe.max_selectable
    # a budget a row's plan cannot reach (e.g. fastv at layer 2 below its smallest average) is
    # reported as unreachable, found before any answer is computed, and the rest of the run goes on
    counts = sorted({pipe.visual_tokens(item.image)[0] for item in items}) if pipe.layout.name != "single" \
        else [pipe.max_selectable]
    unreachable: dict = {}
    for method in selectors:
        _use(pipe, specs[method], merge, exported)
        for keep in keeps:
            for n in counts:
                try:
                    pipe.plan(min(keep, n), n)
                except InputError as exc:
                    unreachable.setdefault(method, {})[str(keep)] = str(exc)
                    log(f"{method} K={keep}: unreachable: {exc}")
                    bar.update(len(items))
                    break
    try:
        merges = {}
        merges[selectors[0]] = _use(pipe, specs[selectors[0]], merge, exported)
        full = answer_all(("unpruned", full_keep), None)
        runs = {}
        for method in selectors:
            merges[method] = _use(pipe, specs[method], merge, exported)
            for keep in keeps:
                if str(keep) in unreachable.get(method, {}):
                    continue
                if keep >= full_keep:
                    runs[(method, keep)] = full
                    bar.update(len(items))
                    continue
                runs[(method, keep)] = answer_all((method, keep), keep)
                log(f"{method} K={keep}: {runs[(method, keep)].mean():.3f} (unpruned {full.mean():.3f})")
    finally:
        bar.close()
    if gallery is not None:
        written = _write_gallery(pipe, gallery, items, answers, stages)
        log(f"wrote {written} pictures to {gallery}")
    categories = [item.category for item in items]
    summary = summarize(categories, full, runs)
    pruned = {(m, k): c for (m, k), c in runs.items() if k < full_keep}
    agreement: dict = {}
    for method, keep in pruned:
        agreement.setdefault(method, {})[str(keep)] = agreement_cell(kls[(method, keep)], top1s[(method, keep)])
    return {
        "schema": SCHEMA,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "directory": str(Path(directory).resolve()),
        "model_source": str(pipe.manifest["model"]["source"]),
        "task": task,
        "settings": {"keeps": keeps, "selectors": selectors, "items": len(items), "skip": int(skip),
                     "max_new_tokens": max_new_tokens,
                     "budget": budget, "positions": pipe.positions, "merge": merges,
                     "split": split if task in BUILTIN_TASKS else None, "num_visual_tokens": pipe.max_selectable},
        "elapsed_s": round(time.perf_counter() - t0, 1),
        **summary,
        "unreachable": unreachable,
        "agreement": agreement,
        "versus": {"reference": selectors[0], "against": versus(pruned, selectors[0], kls)},
        "examples": [
            {"question": item.question, "answer": list(item.answer), "category": item.category,
             **{f"{k[0]}@{k[1]}": answers[k][i] for k in answers}}
            for i, item in enumerate(items[:20])
        ],
    }


def _gallery_folder(path) -> Path:
    """The gallery's folder, created if its parent exists; checked before the evaluation runs."""
    from ..bench.report import check_writable

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--gallery {path} is a file; pass a folder")
    if not path.parent.is_dir():
        raise InputError(f"--gallery {path}: the folder {path.parent} does not exist")
    path.mkdir(exist_ok=True)
    check_writable(path / "probe.png")
    return path


def _write_gallery(pipe, folder: Path, items, answers, stages) -> int:
    """One PNG per (item, budget): every selector's kept patches side by side, under the question."""
    from ..runtime.kept_view import panels, save_png, compose

    unpruned = next(preds for key, preds in answers.items() if key[0] == "unpruned")
    for (i, keep), runs in sorted(stages.items()):
        item = items[i]
        row = []
        for method, pred, stage in runs:
            verdict = "right" if score(item, pred) else "wrong"
            row += [(f"{caption}: {pred!r} ({verdict})", panel) for caption, panel in panels(pipe, item.image, stage)
                    if "merged groups" not in caption]
        title = f"{item.question}  answer {item.answer[0]!r}, unpruned {unpruned[i]!r}"
        save_png(compose([row], title), folder / f"item{i:03d}-k{keep}.png")
    return len(stages)


def _use(pipe, spec, merge: str | None, exported: tuple[str, str]) -> str:
    """Switch to a parsed spec; returns the token merging it runs with: its own merge=..., else the
    run's `merge`, else the export's (for the export's method) or the method's own default."""
    from .. import selector as selector_registry

    name, params = spec
    params = dict(params)
    default = exported[1] if name == exported[0] else selector_registry.get(name).merge
    pipe.merge = params.pop("merge", merge if merge is not None else default)
    pipe.use_selector(name, **params)
    return pipe.merge


__all__ = ["Item", "run_eval", "parse_selector_spec", "summarize", "wilson", "relative_interval", "paired_difference",
           "mcnemar_p", "versus", "log_softmax", "kl_divergence", "kl_comparison", "mean_interval", "agreement_cell",
           "SCHEMA"]
