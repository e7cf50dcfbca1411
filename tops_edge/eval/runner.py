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
from dataclasses import dataclass
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
             pipeline=None, merge: str | None = None, skip: int = 0, gallery=None, gallery_items: int = 4,
             jobs: int = 1) -> dict:
    """Evaluate an export on `task` (`shapesvqa` or a JSONL path) for each selector and budget.
    `selectors` are names or specs with parameters (`tops:stages=1`, see parse_selector_spec); each spec
    is a row of the report under its own text; `merge=none|mean` in a spec sets that row's token
    merging (e.g. `dpp-merge:merge=none`). `positions` overrides the export's position convention
    (`compact` or `original`) for this run; `merge` sets the token merging of every row that does
    not set its own (default: the export's for the export's own method, each other method's own
    default, e.g. none for tops and mean for dpp-merge). `skip` drops the task's first items (then `limit` counts from there). `gallery`, a
    folder, receives one PNG per item and pruned budget for the first `gallery_items` items: each
    selector's kept patches side by side (runtime/kept_view.py). `jobs` > 1 splits the items into that
    many contiguous shares, each answered by its own worker process (a Pipeline of its own on
    `backend`, with cores / jobs ONNX Runtime threads unless TOPS_EDGE_THREADS is set); the report is
    assembled from every item's answer as one process would (a caller's `pipeline` needs jobs = 1).
    Returns the report (schema `tops-eval/1`, see report.py)."""
    from tqdm.auto import tqdm

    from .. import selector as selector_registry
    from ..runtime import Pipeline
    from ..selector.merge import MERGES

    log = log or (lambda msg: None)
    if not Path(directory).is_dir():
        raise InputError(f"{directory} is not a directory; pass the --out DIR of tops-export")
    jobs = check_count("--jobs", jobs, 1)
    if jobs > 1 and pipeline is not None:
        raise InputError("jobs > 1 loads a pipeline per worker from the directory: pass pipeline= only with jobs = 1")
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
        if pipe.layout.name == "mrope" and positions != "original":
            raise InputError("Qwen-VL's M-RoPE positions are `original` only: --positions compact has no meaning "
                             "on its 2-D position grid (docs/qwen-vl.md)")
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
    jobs = min(jobs, len(items))
    log(f"{len(items)} items, selectors {', '.join(selectors)}, keeps {', '.join(map(str, keeps))}")
    t0 = time.perf_counter()
    full_keep = pipe.max_selectable
    # a budget a row's plan cannot reach (e.g. fastv at layer 2 below its smallest average) is
    # reported as unreachable, found before any answer is computed, and the rest of the run goes on
    counts = sorted({pipe.visual_tokens(item.image)[0] for item in items}) if pipe.layout.name != "single" \
        else [pipe.max_selectable]
    unreachable: dict = {}
    merges = {}
    for method in selectors:
        merges[method] = _use(pipe, specs[method], merge, exported)
        for keep in keeps:
            for n in counts:
                try:
                    pipe.plan(min(keep, n), n)
                except InputError as exc:
                    unreachable.setdefault(method, {})[str(keep)] = str(exc)
                    log(f"{method} K={keep}: unreachable: {exc}")
                    break
    # the (row, budget) runs to answer: a budget at or above every visual token is the unpruned run
    work = [(method, keep) for method in selectors for keep in keeps
            if str(keep) not in unreachable.get(method, {}) and keep < full_keep]
    plan = _Plan(specs=specs, work=work, merge=merge, exported=exported, budget=budget,
                 max_new_tokens=max_new_tokens, gallery_items=gallery_items if gallery is not None else 0)
    bar = tqdm(total=len(items) * (1 + len(work)), desc="tops-eval", unit="answer", disable=not progress, leave=False)
    try:
        if jobs == 1:
            shard = _answer(pipe, items, plan, bar.update, log)
        else:  # the workers' rows end together: without a progress bar, a line per tenth of the answers
            total, done, tenth = len(items) * (1 + len(work)), [0], [0]

            def advance(n):
                bar.update(n)
                done[0] += n
                if not progress and 10 * done[0] // total > tenth[0]:
                    tenth[0] = 10 * done[0] // total
                    log(f"{done[0]}/{total} answers ({time.perf_counter() - t0:.0f} s)")

            shard = _answer_in_workers(directory, backend, pipe.positions, items, plan, jobs, advance)
    finally:
        bar.close()
    answers, kls, top1s, stages = shard["answers"], shard["kls"], shard["top1s"], shard["stages"]
    full = _correct(items, answers[("unpruned", full_keep)])
    runs = {}
    for method in selectors:
        for keep in keeps:
            if str(keep) in unreachable.get(method, {}):
                continue
            runs[(method, keep)] = full if keep >= full_keep else _correct(items, answers[(method, keep)])
    if jobs > 1:  # one process logs each row's figure as it ends; workers' rows end together
        for method, keep in work:
            log(f"{method} K={keep}: {runs[(method, keep)].mean():.3f} (unpruned {full.mean():.3f})")
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
        "settings": {"keeps": keeps, "selectors": selectors, "items": len(items), "skip": int(skip), "jobs": jobs,
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


@dataclass(frozen=True)
class _Plan:
    """What every share of the items is asked: the rows' parsed specs, the (row, budget) runs in order,
    the merging rules, and generation settings."""

    specs: dict
    work: list
    merge: str | None
    exported: tuple
    budget: str | None
    max_new_tokens: int
    gallery_items: int


def _answer(pipe, items, plan: _Plan, advance, log, first: int = 0) -> dict:
    """Answer `items` (the run's items first .. first + len - 1) unpruned, then for each run of
    `plan.work`: {"answers": {(row, keep): [prediction]}, "kls" / "top1s": {(row, keep): per-item KL
    to the unpruned first answer token / 1 where its top token is the unpruned one}, "stages":
    {(run item, keep): [(row, prediction, Stage)]} for the gallery's items}. The unpruned run of
    the same items is the reference of every KL, so a share of the items is self-contained."""
    answers, kls, top1s, stages = {}, {}, {}, {}
    full_logprobs = None

    def answer_all(key, keep):
        nonlocal full_logprobs
        preds, logprobs = [], []
        for i, item in enumerate(items):
            n = pipe.visual_tokens(item.image)[0] if pipe.layout.name != "single" else pipe.max_selectable
            k = n if keep is None else min(keep, n)  # None: every visual token
            r = pipe.generate(item.image, item.prompt, max_new_tokens=plan.max_new_tokens, keep=k, budget=plan.budget,
                              output_logits=True)
            preds.append(r.text.strip())
            if first + i < plan.gallery_items and keep is not None:
                stages.setdefault((first + i, keep), []).append((key[0], preds[-1], Stage.of(r, f"{key[0]}, K={k}")))
            logprobs.append(log_softmax(r.logits[0]).astype(np.float32))
            advance(1)
        answers[key] = preds
        # [items, V] float32 log-probabilities of the first answer token (the unpruned ones held for
        # the whole share: items x vocabulary x 4 bytes, 128 MB for 1000 items on a 32k vocabulary)
        logprobs = np.stack(logprobs) if logprobs else np.zeros((0, 1), np.float32)
        if keep is None:
            full_logprobs = logprobs
        else:
            kls[key] = kl_divergence(full_logprobs, logprobs)
            top1s[key] = (logprobs.argmax(-1) == full_logprobs.argmax(-1)).astype(np.int64)
        return preds

    first_row = next(iter(plan.specs))
    _use(pipe, plan.specs[first_row], plan.merge, plan.exported)
    full = _correct(items, answer_all(("unpruned", pipe.max_selectable), None))
    for method, keep in plan.work:
        _use(pipe, plan.specs[method], plan.merge, plan.exported)
        right = _correct(items, answer_all((method, keep), keep))
        log(f"{method} K={keep}: {right.mean():.3f} (unpruned {full.mean():.3f})")
    return {"answers": answers, "kls": kls, "top1s": top1s, "stages": stages}


def _correct(items, preds) -> np.ndarray:
    return np.array([score(item, p) for item, p in zip(items, preds)], dtype=np.int64)


def _worker(queue, index, directory, backend, positions, items, plan, first, threads) -> None:
    """One share of the items in its own process: its answers go back through `queue` as
    ("done", index, shard), progress as ("progress", n), a failure as ("error", index, message, is_input)."""
    import os
    import traceback

    os.environ.setdefault("TOPS_EDGE_THREADS", str(threads))
    try:
        from ..runtime import Pipeline

        pipe = Pipeline.load(directory, backend=backend)
        pipe.positions = positions
        pending = 0

        def advance(n):
            nonlocal pending
            pending += n
            if pending >= 8:
                queue.put(("progress", pending))
                pending = 0

        shard = _answer(pipe, items, plan, advance, lambda msg: None, first=first)
        queue.put(("progress", pending))
        queue.put(("done", index, shard))
    except InputError as exc:
        queue.put(("error", index, str(exc), True))
    except BaseException:  # noqa: BLE001 - a worker's failure is reported by the parent, with its traceback
        queue.put(("error", index, traceback.format_exc(), False))


def _answer_in_workers(directory, backend, positions, items, plan: _Plan, jobs: int, advance) -> dict:
    """`_answer` over `jobs` contiguous shares of the items, each in a spawned worker process; the
    shares' results joined in item order."""
    import multiprocessing as mp
    import os
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    bounds = np.linspace(0, len(items), jobs + 1).astype(int)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(queue, j, str(directory), backend, positions, items[bounds[j]:bounds[j + 1]], plan,
                               int(bounds[j]), threads))
             for j in range(jobs)]
    for proc in procs:
        proc.start()
    shards: dict = {}
    try:
        while len(shards) < jobs:
            try:
                message = queue.get(timeout=5)
            except queue_mod.Empty:
                dead = [j for j, proc in enumerate(procs) if j not in shards and not proc.is_alive()]
                if dead:
                    raise RuntimeError(f"tops-eval worker {dead[0]} exited (code {procs[dead[0]].exitcode}) "
                                       f"without its answers") from None
                continue
            if message[0] == "progress":
                advance(message[1])
            elif message[0] == "done":
                shards[message[1]] = message[2]
            else:
                _, j, text, is_input = message
                if is_input:
                    raise InputError(text)
                raise RuntimeError(f"tops-eval worker {j} failed:\n{text}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
    joined: dict = {"answers": {}, "kls": {}, "top1s": {}, "stages": {}}
    for j in range(jobs):
        shard = shards[j]
        for key, preds in shard["answers"].items():
            joined["answers"].setdefault(key, []).extend(preds)
        for part in ("kls", "top1s"):
            for key, values in shard[part].items():
                joined[part][key] = np.concatenate([joined[part][key], values]) if key in joined[part] else values
        joined["stages"].update(shard["stages"])
    return joined


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
