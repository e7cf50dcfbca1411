"""`Pipeline`: vision -> selector -> splice -> prefill on the reduced sequence -> decode.

    pipe = Pipeline.load("out/tiny")
    result = pipe.generate("cat.png", "What is in the picture?", keep=64)
    for chunk in pipe.stream("cat.png", "Describe it."):
        print(chunk.text, end="")

One Pipeline may be shared by threads: a generation holds the pipeline from its first step to its
last (a stream from its first chunk until it ends, is closed, or its for loop is left), so
concurrent calls run one after another, in turn, each as it would alone. `use_selector` waits for
the running generation.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ContextLengthError, InputError
from ..export.manifest import load_manifest
from ..selector.base import check_keep, keep_from_ratio
from ..selector.base import get as get_selector
from ..selector.merge import MERGES
from ..selector.methods import probe_cuts, refuse_layout
from .backend import KVLayout, get_backend
from .layout import BUDGETS, TokenMap, layout_for, split_budget
from .preprocess import Preprocessor
from .result import JSON_KEYS, GenerationResult, GenerationStream, PromptRows, StreamChunk  # noqa: F401  (the API's names)
from .sampling import check_sampling, next_token


@dataclass
class _Timer:
    ms: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, since: float) -> float:
        now = time.perf_counter()
        self.ms[key] = self.ms.get(key, 0.0) + (now - since) * 1e3
        return now


def _params_key(params: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in params.items()))


class _ClosingStream(GenerationStream):
    """A GenerationStream that hands the pipeline back as soon as its consumer is done with it: at the
    end, on `close()` (or leaving a `with` block), when a for loop over it is left early (break, an
    exception) and when it is dropped. A stream closed before its end has `.result` too: the tokens
    so far, `finish_reason` "stop". Close it from the thread that iterates it."""

    def __init__(self, steps, pre, partial: list):
        super().__init__(steps, pre)
        self._partial = partial
        self._closed = False

    def __iter__(self):
        if self._closed:
            return
        try:
            yield from super().__iter__()
        finally:
            self.close()

    def close(self) -> None:
        self._closed = True
        self._steps.close()  # GeneratorExit in the generation: it records the partial result and unlocks
        if self.result is None and self._partial:
            self.result = self._partial[0]

    def __enter__(self) -> "_ClosingStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Pipeline:
    def __init__(self, directory: Path, manifest: dict, backend):
        self.directory = directory
        self.manifest = manifest
        self.backend = backend
        parts = manifest["parts"]
        visual, dec, sel = manifest["visual"], manifest["decoder"], manifest["selector"]
        self.layout = layout_for(visual)
        #: visual tokens a selector chooses among in the longest image sequence (every image for `single`)
        self.max_selectable = int(visual["max_selectable"])
        self.selector_method = sel["method"]
        self.default_keep = sel["default_keep"]
        self.default_keep_ratio = sel["default_keep_ratio"]
        self.budget = sel["budget"]
        self.positions = sel["positions"]
        #: "mean": dropped tokens are merged into their most similar kept token, which then counts as
        #: its group's size in attention (selector/merge.py); "none": selection only
        self.merge = sel["merge"]
        self.max_context = int(dec["max_context"])
        self.eos_ids = set(dec["eos_token_ids"])
        self.pre = Preprocessor(directory, int(visual["image_token_id"]), self.layout.name)
        #: the current image's token grid (rows, cols): what TopV's token positions are measured on
        self._grid: tuple[int, int] | None = None
        arrays = manifest.get("arrays", {})
        self.image_newline = np.load(directory / arrays["image_newline"]["path"]) if "image_newline" in arrays else None
        part_path = lambda name: directory / parts[name]["files"][0]["path"]  # noqa: E731
        self.vision = backend.session(part_path("vision"))
        self.selector = backend.session(part_path("selector")) if "selector" in parts else None
        # the graph at decoder cuts: a method's own for an in-LLM one, the second for one that prunes
        # both before the LLM and inside it, none for a method that prunes only before it
        self.cut_selector = backend.session(part_path("cut_selector")) if "cut_selector" in parts else \
            (self.selector if sel["stage"] == "llm" else None)
        self._selectors = {(self.selector_method, _params_key(sel["params"])): (self.selector, self.cut_selector)}
        self.selector_params = dict(sel["params"])
        self.embed = backend.session(part_path("embed"))
        self._embed_token = None  # the decode loop's bound embedding run (see _token_embedder)
        self._token_id = np.zeros((1, 1), dtype=np.int64)
        #: the decoder's segments in order ([first, last) layers each; one when the export has no cuts),
        #: each with its own KV cache; a cut segment hands its hidden state to the next one
        self.num_layers = int(dec["num_layers"])
        self.cuts = tuple(int(c) for c in dec["cuts"])
        self.segment_layers = [tuple(seg["layers"]) for seg in dec["segments"]]
        #: the cuts whose segment before them also outputs the next layer's post-attention states
        #: (cut_target_features: what topv's target_features are read from)
        self.probed_cuts = tuple(b for seg, (a, b) in zip(dec["segments"], self.segment_layers) if seg.get("probe"))
        self.decoders = [backend.decoder(part_path(seg["part"]), KVLayout(b - a, dec["num_kv_heads"], dec["head_dim"]))
                         for seg, (a, b) in zip(dec["segments"], self.segment_layers)]
        for runner, following in zip(self.decoders, self.decoders[1:]):
            runner.hand_on_to(following)
        # one generation at a time: the KV caches, the decode loop's bound buffers and the current
        # selector are the pipeline's, not the call's
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread that last ran a step of the generation holding it

    @contextmanager
    def _exclusive(self):
        """Holds the pipeline (waits for the running generation). A thread that already holds it, i.e.
        that left a stream open and calls again, gets an error instead of waiting for itself forever."""
        if not self._lock.acquire(blocking=False):
            if self._holder == threading.get_ident():
                raise RuntimeError("this thread has a stream of this Pipeline still open, and it holds the pipeline "
                                   "until it ends: iterate it to the end or close() it before another call")
            self._lock.acquire()
        self._holder = threading.get_ident()
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()

    @property
    def needs_instruction(self) -> bool:
        return self.selector is not None and "instruction_embeds" in self.selector.input_names

    @property
    def decoder(self):
        """The decoder's runner (the first segment's, of a decoder cut into segments)."""
        return self.decoders[0]

    @property
    def _parts(self):
        return list(dict.fromkeys(p for p in (self.vision, self.selector, self.cut_selector, self.embed, *self.decoders)
                                  if p is not None))

    def use_selector(self, method: str, **params) -> "Pipeline":
        """Switch to another registered selector (and/or parameters) without re-exporting: its graph
        is built from the registry's ONNX form with this export's shapes and kept for later switches.
        The vision graph must provide what the method reads (`cls_attention` for `attention`).
        Waits for a generation running in another thread; the switch applies from the next one."""
        with self._exclusive():
            return self._use_selector(method, **params)

    def _use_selector(self, method: str, **params) -> "Pipeline":
        from .. import selector as selectors
        from ..selector.parts import selector_part

        info = selectors.get(method)
        resolved = info.resolve_params(params)
        key = (method, _params_key(resolved if info.prunes else {}))
        if key not in self._selectors:
            if not info.prunes:
                self._selectors[key] = (None, None)
            else:
                info.extra_inputs(resolved)  # the parameters, checked (an InputError names a bad one)
                refuse_layout(method, resolved, self.layout.name)
                self._check_probes(method, resolved)
                vision_outputs = {o["name"]: o for o in self.manifest["parts"]["vision"]["outputs"]}
                missing = [name for name in info.extra_inputs(resolved)
                           if name in ("vision_features", "cls_attention") and name not in vision_outputs]
                if missing:
                    raise InputError(f"selector '{method}' needs the vision graph's {', '.join(missing)}, which this "
                                     f"export lacks; re-export with tops-export --selector {method}")
                width = vision_outputs["vision_features"]["shape"][-1]
                graphs = [self.backend.session(selector_part(
                    method, resolved, self.manifest["visual"], int(self.manifest["decoder"]["hidden_size"]), int(width),
                    at=at).onnx_model().SerializeToString()) for at in info.stages]
                self._selectors[key] = (graphs[0], graphs[-1] if "llm" in info.stages else None)
        self.selector, self.cut_selector = self._selectors[key]
        self.selector_method = method
        self.selector_params = resolved if info.prunes else {}
        return self

    def _check_probes(self, method: str, params: dict) -> None:
        """A method whose graph at a cut reads target_features (topv) needs the segment before that
        cut to output the next layer's post-attention states, which only an export for it computes."""
        missing = [c for c in probe_cuts(method, params, self.num_layers) if c not in self.probed_cuts]
        if missing:
            layer = missing[0]
            why = (f"this export ({self.manifest['selector']['method']}) does not compute them" if layer in self.cuts
                   else f"this export's decoder is not cut there (its cuts: {','.join(map(str, self.cuts)) or 'none'})")
            default = get_selector(method).params.get("layer")
            tail = f" --selector-param layer={layer}" if "layer" in params and params["layer"] != default else ""
            raise InputError(f"selector '{method}' reads layer {layer}'s post-attention-norm states at the cut before "
                             f"it, and {why}; re-export with tops-export --selector {method}{tail}")

    @classmethod
    def load(cls, directory, backend: str = "ort", verify: str = "fast", **backend_options) -> "Pipeline":
        """Validate DIR/manifest.json (schema and graph hashes) and open every part on `backend`."""
        directory = Path(directory)
        manifest = load_manifest(directory, verify=verify)
        from ..selector.parts import PLUGIN_METHODS

        if manifest.get("target") == "trt" and backend != "trt" and "selector" in manifest["parts"] \
                and manifest["selector"]["method"] in PLUGIN_METHODS:
            raise InputError(f"{directory} was exported with --target trt: its selector is the tops::Select TensorRT "
                             "plugin, which only backend 'trt' runs; re-export with --target ort for this backend")
        return cls(directory, manifest, get_backend(backend, **backend_options))

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image for a `single` layout; the most any image can have for `anyres`
        (use `visual_tokens(image)` for one image's count)."""
        return int(self.manifest["visual"]["max_tokens"])

    def visual_tokens(self, image) -> tuple[int, int]:
        """(selectable, total) visual tokens of IMAGE: a budget K is taken from the selectable ones;
        the total adds tokens that are always kept (LLaVA-NeXT's row newlines)."""
        if self.layout.name == "single":
            n = self.layout.tokens_per_crop
            return n, n
        token_map = self.layout.token_map(self.pre.image_inputs(image)[1])
        return token_map.selectable, len(token_map)

    # --- public API ------------------------------------------------------------------------
    def generate(self, image, prompt: str, max_new_tokens: int = 64, keep: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 raw_prompt: bool = False, ignore_eos: bool = False, keep_ratio: float | None = None,
                 budget: str | None = None, output_logits: bool = False) -> GenerationResult:
        """Answer PROMPT about IMAGE. The visual-token budget is `keep` tokens or `keep_ratio` of the
        image's tokens (default: the export's); `budget` splits it over an anyres image's crops
        (`proportional` or `global`; default: the export's). `ignore_eos` generates exactly
        max_new_tokens tokens (for benchmarks at equal length). `output_logits` returns each new
        token's raw logits in `result.logits` (a copy per token; off by default)."""
        steps = self._steps(image, prompt, max_new_tokens, keep, temperature, top_p, seed, raw_prompt, ignore_eos,
                            keep_ratio, budget, output_logits)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    def stream(self, image, prompt: str, max_new_tokens: int = 64, keep: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               raw_prompt: bool = False, ignore_eos: bool = False, keep_ratio: float | None = None,
               budget: str | None = None) -> GenerationStream:
        """`generate`, chunk by chunk. The stream holds the pipeline from its first chunk until it
        ends, is closed (`close()`, a `with` block) or a for loop over it is left; a stream closed
        early still has `.result`, of the tokens so far, with `finish_reason` "stop"."""
        partial: list[GenerationResult] = []
        steps = self._steps(image, prompt, max_new_tokens, keep, temperature, top_p, seed, raw_prompt, ignore_eos,
                            keep_ratio, budget, partial=partial)
        return _ClosingStream(steps, self.pre, partial)

    def prompt_positions(self, num_before: int, kept: np.ndarray, num_after: int, num_visual: int,
                         token_map: TokenMap | None = None) -> np.ndarray:
        """Position ids of the prefill sequence. `compact`: 0..L-1, the kept tokens renumbered
        contiguously. `original`: every token keeps the position it had in the unpruned sequence (of
        `num_visual` visual tokens), so the text after the image (and decoding) resumes at the
        unpruned length. The `mrope` layout (Qwen-VL) gives [3, L] M-RoPE rows, always `original`."""
        if self.layout.name == "mrope":
            return self.layout.positions(num_before, kept, num_after, token_map)
        if self.positions == "compact":
            return np.arange(num_before + len(kept) + num_after, dtype=np.int64)
        after_start = num_before + num_visual
        return np.concatenate([
            np.arange(num_before), num_before + np.asarray(kept), np.arange(after_start, after_start + num_after),
        ]).astype(np.int64)

    def resolve_keep(self, keep: int | None, num_tokens: int | None = None, keep_ratio: float | None = None) -> int:
        """The budget K for an image of `num_tokens` selectable visual tokens (default: the most)."""
        n = self.max_selectable if num_tokens is None else num_tokens
        if keep is not None and keep_ratio is not None:
            raise InputError("pass keep or keep_ratio, not both")
        if self.selector is None:
            if (keep is not None and keep != n) or (keep_ratio is not None and keep_ratio != 1.0):
                raise InputError(
                    f"this export has no selector (--selector none): it keeps all {n} visual tokens; re-export with --selector"
                )
            return n
        if keep is not None:
            owner = "this model has {n} visual tokens per image" if self.layout.name == "single" else \
                "this image has {n} visual tokens to choose from (LLaVA-NeXT: the count depends on the image size)"
            return check_keep(keep, n, owner)
        if keep_ratio is not None:
            return keep_from_ratio(keep_ratio, n)
        if self.default_keep_ratio is not None:
            return keep_from_ratio(self.default_keep_ratio, n)
        return n if self.default_keep is None else min(int(self.default_keep), n)

    def plan(self, keep: int, num_selectable: int):
        """The pruning plan (selector/plan.py) of the current selector at T = `keep` equivalent average
        visual tokens for an image of `num_selectable` tokens: where it prunes and how much. Every cut
        it prunes at must be one this export's decoder was cut at."""
        from ..selector.plan import PruningPlan, plan_for

        if self.selector is None or keep >= num_selectable:
            return PruningPlan((), num_selectable, self.num_layers)
        plan = plan_for(self.selector_method, self.selector_params, keep, num_selectable, self.num_layers)
        missing = [c for c in plan.cuts() if c not in self.cuts]
        if missing:
            have = ",".join(map(str, self.cuts)) or "none"
            raise InputError(f"{self.selector_method} at --keep {keep} prunes inside the LLM at layer "
                             f"{','.join(map(str, missing))}, which this export's decoder was not cut at (its cuts: "
                             f"{have}); re-export with tops-export --cuts {','.join(map(str, sorted(set(self.cuts) | set(missing))))}")
        return plan

    def resolve_budget(self, budget: str | None) -> str:
        budget = self.budget if budget is None else budget
        if budget not in BUDGETS:
            raise InputError(f"budget '{budget}' is not one of: {', '.join(BUDGETS)}")
        return budget

    # --- stages --------------------------------------------------------------------------------
    def _select(self, vision: dict, token_map: TokenMap, instruction: np.ndarray | None, keep: int, budget: str):
        """Kept positions in the image's visual sequence (ascending; tokens that no selector sees,
        such as NeXT's newlines, always kept), the sequence's features [T, D] (with `merge = "mean"`
        a kept token's row is its group's mean), the kept tokens' group sizes [K'] (1 unmerged) and
        each sequence token's kept slot [T] (GenerationResult.token_groups)."""
        merge = self.merge  # once: another thread may set it for the next generation
        if merge not in MERGES:
            raise InputError(f"merge must be one of {', '.join(MERGES)}, got '{merge}'")
        features = token_map.gather(vision["image_features"], self.image_newline)
        if self.selector is None or keep >= token_map.selectable:
            everything = np.arange(len(token_map))
            return everything, features, np.ones(len(token_map), dtype=np.int64), everything
        gathered = {"image_features": features}
        for name in ("vision_features", "cls_attention"):
            if name in self.selector.input_names:
                gathered[name] = token_map.gather(vision[name])
        common = {}
        if instruction is not None:
            common["instruction_embeds"] = self.embed.run({"input_ids": instruction[None]})["inputs_embeds"]
            common["instruction_mask"] = np.ones((1, len(instruction)), dtype=np.int64)
        if budget == "global" or len(token_map.grids) == 1:
            members = [np.flatnonzero(token_map.segment >= 0)]
            grids = [token_map.grids[0] if len(token_map.grids) == 1 else (1, len(members[0]))]
        else:
            members = [np.flatnonzero(token_map.segment == s) for s in range(len(token_map.grids))]
            grids = list(token_map.grids)
        shares = split_budget(keep, [len(m) for m in members])
        kept = [token_map.newlines]
        sizes = np.ones(len(token_map), dtype=np.int64)
        owner = np.full(len(token_map), -1, dtype=np.int64)  # the sequence position each token's group is kept at
        merged_features = features.copy() if merge == "mean" else features
        for idx, share, grid in zip(members, shares, grids):
            if share >= len(idx):
                kept.append(idx)
                owner[idx] = idx
            elif share > 0:
                feeds = dict(common, keep=np.array(share, dtype=np.int64),
                             grid_h=np.array(grid[0], dtype=np.int64), grid_w=np.array(grid[1], dtype=np.int64))
                for name, value in gathered.items():
                    feeds[name] = value[idx][None]
                out = self.selector.run({name: feeds[name] for name in self.selector.input_names})
                order = np.argsort(out["kept_indices"][0], kind="stable")  # ascending already, by contract
                chosen = out["kept_indices"][0][order]
                kept.append(idx[chosen])
                owner[idx[chosen]] = idx[chosen]
                if merge == "mean":  # the graph merged within the group the budget was split over
                    merged_features[idx[chosen]] = out["merged_features"][0][order]
                    sizes[idx[chosen]] = out["kept_sizes"][0][order]
                    if "token_groups" in out:  # exports before it was an output draw no groups
                        owner[idx] = idx[out["kept_indices"][0][out["token_groups"][0]]]
        kept = np.sort(np.concatenate(kept)).astype(np.int64)
        owner[token_map.newlines] = token_map.newlines
        groups = np.where(owner >= 0, np.searchsorted(kept, owner), -1)
        return kept, merged_features, sizes[kept], groups

    @staticmethod
    def _deepstack(vision: dict, token_map: TokenMap, groups: np.ndarray | None, num_kept: int) -> np.ndarray | None:
        """[L_ds, T, D] DeepStack rows in the image's sequence order (None when the vision graph has
        none). With token merging (`groups`: each token's kept slot), a kept token's rows are its
        group's mean, as its image features are."""
        if "deepstack_features" not in vision:
            return None
        rows = vision["deepstack_features"][:, token_map.source]  # one image: source indexes its tokens
        if groups is None:
            return rows
        sums = np.zeros((rows.shape[0], num_kept, rows.shape[2]), dtype=np.float32)
        np.add.at(sums, (slice(None), groups), rows)
        counts = np.bincount(groups, minlength=num_kept).astype(np.float32)
        means = sums / np.maximum(counts, 1.0)[None, :, None]
        out = rows.copy()
        kept_at = np.flatnonzero(groups >= 0)
        out[:, kept_at] = means[:, groups[kept_at]]
        return out

    def _token_embedder(self):
        """The decode loop's embedding lookup: the embed graph run over fixed buffers (bound once),
        from `_token_id` into the decoder's one-token input. Per token, a bound run costs a fraction
        of a run with fresh arrays (measured ~75 us per token for `run` on tiny-llava-medium)."""
        if self._embed_token is None:
            self._embed_token = self.embed.bind({"input_ids": self._token_id},
                                                {"inputs_embeds": self.decoder.token_embeds})
        return self._embed_token

    def _select_at_cut(self, hidden: np.ndarray, attention: np.ndarray, rows: "PromptRows", keep: int,
                       plan=None, target: np.ndarray | None = None) -> np.ndarray:
        """At a decoder cut: the rows of the prefill sequence that go on (text, kept visual tokens).
        The stage's selector reads the alive visual tokens' hidden states, the cut layer's attention
        from the text after the image to them and that text's hidden states, the alive tokens' rows
        of the next layer's probe (`target` [1, S, D], the segment's cut_target_features) and their
        (row, col) on the patch grid (what a graph asks for); NeXT's newline tokens are always kept."""
        visual = rows.visual_rows()
        choosable = np.flatnonzero(~rows.newline)
        if keep >= len(choosable):
            return np.arange(hidden.shape[1])
        after = np.arange(visual[-1] + 1, hidden.shape[1]) if len(visual) else np.arange(rows.before, hidden.shape[1])
        cols = visual[choosable]
        feeds = {"image_features": hidden[:, cols], "keep": np.array(keep, dtype=np.int64),
                 "text_attention": np.ascontiguousarray(attention[:, after][:, :, cols]),
                 "text_features": hidden[:, after]}
        info = get_selector(self.selector_method)
        if info.cut_feeds is not None and plan is not None:  # e.g. tops's Stage II lam, published per budget
            feeds.update(info.cut_feeds(self.selector_params, plan, self.manifest["visual"].get("layout", "single")))
        graph = self.cut_selector
        if "target_features" in graph.input_names:
            if target is None:  # use_selector refuses this first; a hand-edited manifest could still get here
                raise InputError(f"selector '{self.selector_method}' reads the next layer's post-attention states, "
                                 f"which this export does not compute; re-export with tops-export --selector "
                                 f"{self.selector_method}")
            feeds["target_features"] = np.ascontiguousarray(target[:, cols])
        if "token_positions" in graph.input_names:
            feeds["token_positions"] = self._token_positions(rows.visual[choosable])[None]
        out = graph.run({name: feeds[name] for name in graph.input_names})
        kept = np.sort(np.concatenate([choosable[out["kept_indices"][0]], np.flatnonzero(rows.newline)]))
        return np.concatenate([np.arange(rows.before), visual[kept], after])

    def _token_positions(self, visual: np.ndarray) -> np.ndarray:
        """[N, 2] float32 (row, col) on the image's patch grid of the visual tokens at these positions
        of its visual sequence (selector/topv.token_positions). One grid: `single` layouts only
        (selector/methods.refuse_layout refuses the others before a generation gets here)."""
        from ..selector.topv import token_positions

        if self.layout.name == "mrope":  # one grid per image, the image's own
            return token_positions(visual, *self._grid)
        if self.layout.name != "single":
            refuse_layout(self.selector_method, self.selector_params, self.layout.name)
            raise InputError(f"token positions need one patch grid; the '{self.layout.name}' layout has none")
        return token_positions(visual, *self.layout.grid)

    def _prefill(self, embeds: np.ndarray, positions: np.ndarray, bias: np.ndarray, rows: "PromptRows", plan,
                 max_new_tokens: int, deepstack: np.ndarray | None = None):
        """Runs every decoder segment on the prompt, pruning at the plan's cuts. Returns the last
        position's logits, each segment's next decode position, the stages that ran at cuts, each
        segment's step time and the time the cuts' selectors took (ms). `deepstack` [L_ds, T, D]
        (Qwen3-VL): the rows decoder layers 0..L_ds-1 add to each visual token of the image's
        sequence; a segment holding some of those layers gets its kept tokens' rows."""
        at_cut = {stage.layer: stage.keep for stage in plan.stages if stage.layer > 0}
        hidden, attention, target, stages, next_positions, step_ms, select_ms = embeds, None, None, [], [], [], 0.0
        for runner, (first, _) in zip(self.decoders, self.segment_layers):
            if first in at_cut:
                t = time.perf_counter()
                keep = self._select_at_cut(hidden, attention, rows, at_cut[first], plan, target)
                select_ms += (time.perf_counter() - t) * 1e3
                hidden, bias = hidden[:, keep], bias[:, keep]
                positions = positions[..., keep] if self.positions == "original" else np.arange(len(keep), dtype=np.int64)
                rows = rows.taken(keep)
                stages.append({"layer": first, "keep": int((~rows.newline).sum()), "kept_indices": rows.visual.tolist()})
            runner.reserve(hidden.shape[1] + max_new_tokens - 1)  # the last token is never fed back
            runner.reset()
            t = time.perf_counter()
            injected = None
            if runner.deepstack_rows and deepstack is not None:  # zeros on text rows, as HF's mask adds nothing there
                injected = np.zeros((runner.deepstack_rows, 1, hidden.shape[1], hidden.shape[2]), dtype=np.float32)
                injected[:, 0, rows.visual_rows()] = deepstack[first:first + runner.deepstack_rows][:, rows.visual]
            out = runner.step(hidden, positions[..., None, :], bias, injected)  # [1, S], or M-RoPE's [3, 1, S]
            step_ms.append((time.perf_counter() - t) * 1e3)
            next_positions.append(int(positions[..., -1].max()) + 1)  # M-RoPE: text rows are equal there
            if runner.hands_on:  # (hidden, attention) or, from a segment with the probe, (hidden, attention, target)
                hidden, attention, target = out if len(out) == 3 else (*out, None)
        return out, next_positions, stages, step_ms, select_ms

    # --- the loop ----------------------------------------------------------------------------
    def _steps(self, image, prompt, max_new_tokens, keep, temperature, top_p, seed, raw_prompt, ignore_eos=False,
               keep_ratio=None, budget=None, output_logits=False, partial=None):
        """Yields each new token id; returns the GenerationResult. Holds the pipeline from the first
        step to the last; closed early, it appends the result so far to `partial` (when given)."""
        with self._exclusive():
            return (yield from self._generation(image, prompt, max_new_tokens, keep, temperature, top_p, seed,
                                                raw_prompt, ignore_eos, keep_ratio, budget, output_logits, partial))

    def _generation(self, image, prompt, max_new_tokens, keep, temperature, top_p, seed, raw_prompt, ignore_eos,
                    keep_ratio, budget, output_logits, partial):
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        check_sampling(temperature, top_p)
        budget = self.resolve_budget(budget)
        if keep is not None:  # fail before any work on a budget no image can take
            check_keep(keep, self.max_selectable, "this model has at most {n} visual tokens per image")
        for part in self._parts:
            part.busy_ms = 0.0
        clock = _Timer()
        t = time.perf_counter()
        before, after = self.pre.split_ids(self.pre.prompt_text(prompt, raw=raw_prompt))
        pixels, image_size = self.pre.image_inputs(image)
        token_map = self.layout.token_map(image_size)
        keep = self.resolve_keep(keep, token_map.selectable, keep_ratio)
        plan = self.plan(keep, token_map.selectable)
        first_keep = plan.stages[0].keep if plan.stages and plan.stages[0].layer == 0 else token_map.selectable
        num_visual = len(token_map)
        kept_len = first_keep + len(token_map.newlines) if first_keep < token_map.selectable else num_visual
        prompt_len = len(before) + kept_len + len(after)
        # with `original` positions the ids run to the unpruned length, whatever K is
        span = prompt_len if self.positions == "compact" else len(before) + num_visual + len(after)
        if span + max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({span} positions, {kept_len} of {num_visual} visual tokens kept) + {max_new_tokens} new tokens "
                f"exceeds the model's context of {self.max_context}; lower --max-new-tokens"
                + (" or --keep" if span == prompt_len and self.selector is not None else "")
            )
        instruction = self.pre.instruction_ids(prompt, raw=raw_prompt) if self.needs_instruction else None
        t = clock.add("preprocess", t)

        self._grid = token_map.grids[0]
        vision = self.vision.run(self.layout.vision_feeds(pixels, image_size, token_map))
        t = clock.add("vision", t)
        kept, features, sizes, groups = self._select(vision, token_map, instruction, first_keep, budget)
        merge_used = bool((sizes > 1).any())
        visual = features[kept][None]
        t = clock.add("select", t)

        text = self.embed.run({"input_ids": np.concatenate([before, after])[None]})["inputs_embeds"]
        embeds = np.concatenate([text[:, : len(before)], visual, text[:, len(before) :]], axis=1)
        positions = self.prompt_positions(len(before), kept, len(after), num_visual, token_map)
        bias = np.zeros((1, prompt_len), dtype=np.float32)  # log(group size) on merged visual tokens
        bias[0, len(before) : len(before) + len(kept)] = np.log(sizes)
        rows = PromptRows(len(before), kept, np.isin(kept, token_map.newlines))
        deepstack = self._deepstack(vision, token_map, groups if merge_used else None, len(kept))
        logits, next_positions, cut_stages, segment_ms, cut_select_ms = self._prefill(
            embeds, positions, bias, rows, plan, max_new_tokens, deepstack)
        stages = [{"layer": 0, "keep": first_keep, "kept_indices": [int(i) for i in kept]}] \
            if first_keep < token_map.selectable else []
        t = clock.add("prefill", t)
        clock.ms["prefill"] -= cut_select_ms  # `select` is every stage's selection, in the LLM or before it
        clock.ms["select"] += cut_select_ms

        rng = np.random.default_rng(seed)
        embed_token = self._token_embedder()
        token_ids: list[int] = []
        step_logits: list[np.ndarray] | None = [] if output_logits else None
        finish = "length"
        try:
            for i in range(max_new_tokens):
                if step_logits is not None:  # the backend's output buffer is reused by the next step
                    step_logits.append(np.array(logits, dtype=np.float32, copy=True).reshape(-1))
                tok = next_token(logits, temperature, top_p, rng)
                token_ids.append(tok)
                yield tok
                self._holder = threading.get_ident()  # a stream may be resumed from another thread
                if tok in self.eos_ids and not ignore_eos:
                    finish = "eos"
                    break
                if i + 1 == max_new_tokens:
                    break
                t = time.perf_counter()  # time spent in the caller between tokens is not ours
                self._token_id[0, 0] = tok
                embed_token()  # into the first segment's token_embeds; each segment writes the next one's
                for runner, position in zip(self.decoders, next_positions):
                    logits = runner.step_token(position + i)
                clock.add("decode", t)
        except GeneratorExit:  # the stream was closed before its end
            if partial is None:
                raise
            finish = "stop"

        decode_steps = max(len(token_ids) - 1, 0)
        timings = dict(clock.ms)
        timings["decode_per_token"] = timings.pop("decode", 0.0) / decode_steps if decode_steps else 0.0
        timings["total"] = sum(v for k, v in clock.ms.items())
        timings["sessions"] = sum(part.busy_ms for part in self._parts)  # inside the backend's run calls
        result = GenerationResult(
            text=self.pre.decode(token_ids),
            token_ids=token_ids,
            kept_indices=[int(i) for i in kept],
            kept_sizes=[int(n) for n in sizes],
            token_groups=groups.tolist(),
            stages=stages + cut_stages,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            kv_cache_bytes=sum(runner.bytes_used for runner in self.decoders),
            segment_prefill_ms=[round(ms, 3) for ms in segment_ms],
            segment_kv_bytes=[runner.bytes_used for runner in self.decoders],
            prompt_tokens=prompt_len,
            finish_reason=finish,
            num_visual_tokens=num_visual,
            keep=keep,
            logits=step_logits,
        )
        if finish == "stop":
            partial.append(result)
        return result
