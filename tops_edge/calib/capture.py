"""Calibration inputs captured from the fp32 export itself: the vision graph's preprocessed pixels
and the decoder's prefill after selection and splicing, i.e. exactly what each part will see."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import CalibrationSet


class _RecordingSession:
    """A Session that keeps every feed it runs."""

    def __init__(self, inner):
        self.inner = inner
        self.feeds: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, feeds):
        self.feeds.append({k: np.array(v) for k, v in feeds.items()})
        return self.inner.run(feeds)


class _RecordingDecoder:
    """A DecoderRunner that keeps the prefill step's inputs (the first step after a reset)."""

    def __init__(self, inner):
        self.inner = inner
        self.prefills: list[tuple] = []  # (embeds, positions, bias, deepstack rows or None)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, inputs_embeds, position_ids, attention_bias=None, deepstack=None):
        if self.inner.length == 0:
            bias = np.zeros(inputs_embeds.shape[:2], np.float32) if attention_bias is None else attention_bias
            self.prefills.append((np.array(inputs_embeds, dtype=np.float32), np.array(position_ids, dtype=np.int64),
                                  np.array(bias, dtype=np.float32),
                                  None if deepstack is None else np.array(deepstack, dtype=np.float32)))
        return self.inner.step(inputs_embeds, position_ids, attention_bias, deepstack)


def _pipeline(directory: Path, manifest: dict):
    """The fp32 pipeline on the staged export; a --target trt selector (the TensorRT plugin) is
    replaced by the same method's ONNX form, which selects the same tokens."""
    from ..runtime.backend import get_backend
    from ..runtime.pipeline import Pipeline

    sel = manifest["selector"]
    plugin = manifest.get("target") == "trt" and "selector" in manifest["parts"]
    if plugin:
        manifest = dict(manifest, parts={k: v for k, v in manifest["parts"].items() if k != "selector"})
    pipe = Pipeline(directory, manifest, get_backend("ort"))
    if plugin:
        pipe._selectors.clear()  # the cached "no selector" entry stands for the plugin graph
        pipe.use_selector(sel["method"], **sel["params"])
    return pipe


def capture(directory: Path, manifest: dict, calib: CalibrationSet, progress: bool = False) -> dict[str, list[dict]]:
    """Feeds for each part to calibrate, one per calibration pair: {"vision": [...], "decoder": [...]}; a
    decoder in segments gives each segment's prefill under its part name (decoder.0, decoder.1, ...)."""
    from tqdm.auto import tqdm

    pipe = _pipeline(Path(directory), manifest)
    vision = pipe.vision = _RecordingSession(pipe.vision)
    recorders = [_RecordingDecoder(runner) for runner in pipe.decoders]
    pipe.decoders[:] = recorders
    for image, prompt in tqdm(list(zip(calib.images, calib.prompts)), desc="calibration: fp32 pipeline",
                              unit="pair", disable=not progress, leave=False):
        pipe.generate(image, prompt, max_new_tokens=1)
    dec = manifest["decoder"]
    feeds = {"vision": vision.feeds}
    for seg, recorder in zip(dec["segments"], recorders):
        specs = manifest["parts"][seg["part"]]["inputs"]
        names = {s["name"] for s in specs}
        first = "inputs_embeds" if "inputs_embeds" in names else "hidden_states"  # later segments: hidden states

        def prefill(embeds, positions, bias, deepstack, specs=specs, first=first):  # an empty cache of the prompt's size
            n = embeds.shape[1]
            empty = np.zeros((1, dec["num_kv_heads"], n, dec["head_dim"]), dtype=np.float32)
            known = {first: embeds, "attention_mask": np.ones((1, n), dtype=np.int64), "position_ids": positions,
                     "attention_bias": bias, "cache_position": np.arange(n, dtype=np.int64),
                     "deepstack_embeds": deepstack}  # Qwen3-VL: the rows its first layers added at prefill
            return {s["name"]: empty if s["name"].startswith("past_key_values.") else known[s["name"]] for s in specs}
        feeds[seg["part"]] = [prefill(*args) for args in recorder.prefills]
    return feeds
