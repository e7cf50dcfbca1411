"""What a generation returns: the result, the stream of chunks, and where the visual tokens sit in
each decoder segment's prompt."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from .preprocess import Preprocessor

JSON_KEYS = ("text", "token_ids", "kept_indices", "timings_ms", "kv_cache_bytes", "num_visual_tokens", "keep",
             "kept_sizes", "stages")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    kept_indices: list[int]  # what the first decoder layer sees: positions in the image's visual-token
    # sequence, ascending (newlines included); later pruning stages are in `stages`
    timings_ms: dict[str, float]
    kv_cache_bytes: int  # KV entries held at the end: prompt (with kept visual tokens) + fed new tokens
    prompt_tokens: int = 0  # prefill length, visual tokens included
    finish_reason: str = "length"  # "eos" or "length"
    num_visual_tokens: int = 0  # the image's visual tokens before pruning (LLaVA-NeXT: varies per image)
    keep: int = 0  # the budget T used: the visual tokens kept on average over the decoder's layers
    # (before the LLM: its K; selectable tokens only, NeXT's newlines come on top)
    #: per kept index, the visual tokens it stands for (merge "mean": its group's size; else all 1)
    kept_sizes: list[int] = field(default_factory=list)
    #: per visual token of the image's sequence, the index into `kept_indices` of the kept token that
    #: stands for it: itself when kept, its merged group's token with merge "mean", -1 when dropped
    #: with merge "none". Not part of `to_json`; `tops-run --show-kept` draws it.
    token_groups: list[int] = field(default_factory=list)
    #: every pruning stage that ran, in order: {"layer": 0 before the LLM or the cut's decoder layer,
    #: "keep": tokens kept, "kept_indices": their positions in the image's visual-token sequence}
    stages: list[dict] = field(default_factory=list)
    #: per decoder segment: its prefill step's wall ms and the KV bytes it holds at the end (one
    #: entry for an uncut decoder). Not part of `to_json`; tops-bench reports them.
    segment_prefill_ms: list[float] = field(default_factory=list)
    segment_kv_bytes: list[int] = field(default_factory=list)
    #: with `output_logits=True`, per new token the raw logits [V] it was chosen from (float32, before
    #: temperature and top-p, as HF generate's `output_logits`); else None. Not part of `to_json`.
    logits: list[np.ndarray] | None = None

    def to_json(self) -> dict:
        # field by field: asdict would also deep-copy `logits`, which the JSON leaves out
        return {k: copy.deepcopy(getattr(self, k)) for k in JSON_KEYS}


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


@dataclass(frozen=True)
class PromptRows:
    """Where the visual tokens sit in a segment's prompt: after `before` text tokens, `visual` (their
    positions in the image's visual sequence, ascending), `newline` (which of them are NeXT's row
    newlines, never pruned), then the text after the image."""

    before: int
    visual: np.ndarray
    newline: np.ndarray

    def visual_rows(self) -> np.ndarray:
        return self.before + np.arange(len(self.visual))

    def taken(self, rows: np.ndarray) -> "PromptRows":
        """After a cut kept these prompt rows."""
        picked = rows[(rows >= self.before) & (rows < self.before + len(self.visual))] - self.before
        return PromptRows(self.before, self.visual[picked], self.newline[picked])
