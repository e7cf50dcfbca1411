"""`Pipeline`: vision -> selector -> splice -> prefill on the reduced sequence -> decode.

    pipe = Pipeline.load("out/tiny")
    result = pipe.generate("cat.png", "What is in the picture?", keep=64)
    for chunk in pipe.stream("cat.png", "Describe it."):
        print(chunk.text, end="")
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ContextLengthError, InputError
from ..export.manifest import load_manifest
from ..selector.base import check_keep
from .backend import KVLayout, get_backend
from .preprocess import Preprocessor
from .sampling import check_sampling, next_token

JSON_KEYS = ("text", "token_ids", "kept_indices", "timings_ms", "kv_cache_bytes")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    kept_indices: list[int]  # indices into the image's visual tokens, ascending
    timings_ms: dict[str, float]
    kv_cache_bytes: int  # KV entries held at the end: prompt (with kept visual tokens) + fed new tokens
    prompt_tokens: int = 0  # prefill length, visual tokens included
    finish_reason: str = "length"  # "eos" or "length"

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in JSON_KEYS}


@dataclass
class StreamChunk:
    token_id: int | None  # None only for a last chunk that flushes text held back (see below)
    text: str  # the text this token completes ("" while a multi-byte character is incomplete)


class GenerationStream:
    """Iterates StreamChunks as tokens are decoded; `.result` is set once the iteration ends."""

    def __init__(self, steps, pre: Preprocessor):
        self._steps = steps
        self._pre = pre
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[StreamChunk]:
        ids: list[int] = []
        shown = ""
        while True:
            try:
                tok = next(self._steps)
            except StopIteration as stop:
                self.result = stop.value
                if len(self.result.text) > len(shown):  # ended inside an incomplete character
                    yield StreamChunk(None, self.result.text[len(shown) :])
                return
            ids.append(tok)
            text = self._pre.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
                yield StreamChunk(tok, "")
                continue
            yield StreamChunk(tok, text[len(shown) :])
            shown = text


@dataclass
class _Timer:
    ms: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, since: float) -> float:
        now = time.perf_counter()
        self.ms[key] = self.ms.get(key, 0.0) + (now - since) * 1e3
        return now


class Pipeline:
    def __init__(self, directory: Path, manifest: dict, backend):
        self.directory = directory
        self.manifest = manifest
        self.backend = backend
        parts = manifest["parts"]
        visual, dec = manifest["visual"], manifest["decoder"]
        self.num_visual_tokens = int(visual["tokens_per_image"])
        self.selector_method = manifest["selector"]["method"]
        self.default_keep = int(manifest["selector"]["default_keep"])
        self.positions = manifest["selector"]["positions"]
        self.max_context = int(dec["max_context"])
        self.eos_ids = set(dec["eos_token_ids"])
        self.pre = Preprocessor(directory, int(visual["image_token_id"]))
        part_path = lambda name: directory / parts[name]["files"][0]["path"]  # noqa: E731
        self.vision = backend.session(part_path("vision"))
        self.selector = backend.session(part_path("selector")) if "selector" in parts else None
        self.needs_instruction = self.selector is not None and "instruction_embeds" in self.selector.input_names
        self.embed = backend.session(part_path("embed"))
        self.decoder = backend.decoder(part_path("decoder"), KVLayout(dec["num_layers"], dec["num_kv_heads"], dec["head_dim"]))
        self._parts = [p for p in (self.vision, self.selector, self.embed, self.decoder) if p is not None]

    @classmethod
    def load(cls, directory, backend: str = "ort", verify: str = "fast", **backend_options) -> "Pipeline":
        """Validate DIR/manifest.json (schema and graph hashes) and open every part on `backend`."""
        directory = Path(directory)
        manifest = load_manifest(directory, verify=verify)
        if manifest.get("target") == "trt" and backend != "trt" and "selector" in manifest["parts"]:
            raise InputError(f"{directory} was exported with --target trt: its selector is the tops::Select TensorRT "
                             "plugin, which only backend 'trt' runs; re-export with --target ort for this backend")
        return cls(directory, manifest, get_backend(backend, **backend_options))

    # --- public API ------------------------------------------------------------------------
    def generate(self, image, prompt: str, max_new_tokens: int = 64, keep: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 raw_prompt: bool = False, ignore_eos: bool = False) -> GenerationResult:
        """`ignore_eos` generates exactly max_new_tokens tokens (for benchmarks at equal length)."""
        steps = self._steps(image, prompt, max_new_tokens, keep, temperature, top_p, seed, raw_prompt, ignore_eos)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    def stream(self, image, prompt: str, max_new_tokens: int = 64, keep: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               raw_prompt: bool = False, ignore_eos: bool = False) -> GenerationStream:
        steps = self._steps(image, prompt, max_new_tokens, keep, temperature, top_p, seed, raw_prompt, ignore_eos)
        return GenerationStream(steps, self.pre)

    def prompt_positions(self, num_before: int, kept: np.ndarray, num_after: int) -> np.ndarray:
        """Position ids of the prefill sequence. `compact`: 0..L-1, the kept tokens renumbered
        contiguously. `original`: every token keeps the position it had in the unpruned sequence, so
        the text after the image (and decoding) resumes at the unpruned length."""
        if self.positions == "compact":
            return np.arange(num_before + len(kept) + num_after, dtype=np.int64)
        after_start = num_before + self.num_visual_tokens
        return np.concatenate([
            np.arange(num_before), num_before + np.asarray(kept), np.arange(after_start, after_start + num_after),
        ]).astype(np.int64)

    def _select(self, vision: dict, instruction: np.ndarray | None, keep: int):
        """(kept indices [K], selected features [1,K,D]); K = N skips the selector (the identity)."""
        features = vision["image_features"]
        if self.selector is None or keep >= self.num_visual_tokens:
            return np.arange(self.num_visual_tokens), features
        available = dict(vision, keep=np.array(keep, dtype=np.int64))
        if instruction is not None:
            available["instruction_embeds"] = self.embed.run({"input_ids": instruction[None]})["inputs_embeds"]
            available["instruction_mask"] = np.ones((1, len(instruction)), dtype=np.int64)
        out = self.selector.run({name: available[name] for name in self.selector.input_names})
        return out["kept_indices"][0], out["selected_features"]

    def resolve_keep(self, keep: int | None) -> int:
        n = self.num_visual_tokens
        keep = self.default_keep if keep is None else check_keep(keep, n)
        if self.selector is None and keep != n:
            raise InputError(f"this export has no selector (--selector none): it keeps all {n} visual tokens; re-export with --selector")
        return keep

    # --- the loop ----------------------------------------------------------------------------
    def _steps(self, image, prompt, max_new_tokens, keep, temperature, top_p, seed, raw_prompt, ignore_eos=False):
        """Yields each new token id; returns the GenerationResult."""
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        check_sampling(temperature, top_p)
        keep = self.resolve_keep(keep)
        for part in self._parts:
            part.busy_ms = 0.0
        clock = _Timer()
        t = time.perf_counter()
        before, after = self.pre.split_ids(self.pre.prompt_text(prompt, raw=raw_prompt))
        prompt_len = len(before) + keep + len(after)
        # with `original` positions the ids run to the unpruned length, whatever K is
        span = prompt_len if self.positions == "compact" else prompt_len - keep + self.num_visual_tokens
        if span + max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({span} positions, {keep} visual tokens kept) + {max_new_tokens} new tokens exceeds the "
                f"model's context of {self.max_context}; lower --max-new-tokens" + (" or --keep" if span == prompt_len else "")
            )
        pixels = self.pre.pixel_values(image)
        instruction = self.pre.instruction_ids(prompt, raw=raw_prompt) if self.needs_instruction else None
        t = clock.add("preprocess", t)

        vision = self.vision.run({"pixel_values": pixels})
        t = clock.add("vision", t)
        kept, visual = self._select(vision, instruction, keep)
        t = clock.add("select", t)

        text = self.embed.run({"input_ids": np.concatenate([before, after])[None]})["inputs_embeds"]
        embeds = np.concatenate([text[:, : len(before)], visual, text[:, len(before) :]], axis=1)
        positions = self.prompt_positions(len(before), kept, len(after))
        next_position = int(positions[-1]) + 1
        self.decoder.reserve(prompt_len + max_new_tokens - 1)  # the last token is never fed back
        self.decoder.reset()
        logits = self.decoder.step(embeds, positions[None])
        t = clock.add("prefill", t)

        rng = np.random.default_rng(seed)
        token_ids: list[int] = []
        finish = "length"
        for i in range(max_new_tokens):
            tok = next_token(logits, temperature, top_p, rng)
            token_ids.append(tok)
            yield tok
            if tok in self.eos_ids and not ignore_eos:
                finish = "eos"
                break
            if i + 1 == max_new_tokens:
                break
            t = time.perf_counter()  # time spent in the caller between tokens is not ours
            emb = self.embed.run({"input_ids": np.array([[tok]], dtype=np.int64)})["inputs_embeds"]
            logits = self.decoder.step(emb, np.array([[next_position]], dtype=np.int64))
            next_position += 1
            clock.add("decode", t)

        decode_steps = max(len(token_ids) - 1, 0)
        timings = dict(clock.ms)
        timings["decode_per_token"] = timings.pop("decode", 0.0) / decode_steps if decode_steps else 0.0
        timings["total"] = sum(v for k, v in clock.ms.items())
        timings["sessions"] = sum(part.busy_ms for part in self._parts)  # inside the backend's run calls
        return GenerationResult(
            text=self.pre.decode(token_ids),
            token_ids=token_ids,
            kept_indices=[int(i) for i in kept],
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            kv_cache_bytes=self.decoder.bytes_used,
            prompt_tokens=prompt_len,
            finish_reason=finish,
        )
