"""Selector graphs as parts: what `tops-export` writes and what `Pipeline.use_selector` builds at run
time, from the registry's ONNX forms (so the runtime never imports the exporter)."""

from __future__ import annotations

from typing import Any

from ..models.base import PartSpec, TensorSpec
from . import get, token_grid
from .merge import add_merge_outputs

PLUGIN_METHODS = ("dpp-merge", "cdpruner")  # --target trt: these run as the tops::Select TensorRT plugin


def selector_part(method: str, params: dict[str, Any], layout: dict[str, Any], hidden: int, vision_width: int,
                  target: str = "ort", merge_outputs: bool = True, at: str | None = None) -> PartSpec | None:
    """The selector graph for `method` from its registered ONNX form (with `target` trt, the plugin
    form for PLUGIN_METHODS); None for `none`. It also outputs the token merge of its selection
    (`merged_features`, `kept_sizes`, `token_groups`; selector/merge.py) unless `merge_outputs` is False (timing).

    The graph selects within one segment: a whole image (`single` layout, N fixed) or one crop or the
    whole of an anyres image (N dynamic). Spatial methods get the segment's grid as inputs. `at`
    picks the stage of a method that prunes both before the LLM and at cuts ("vision" or "llm";
    default: its first).
    """
    from .onnx_graph import build_graph

    info = get(method)
    if not info.prunes:
        return None
    at = at or info.stages[0]
    if at == "llm":
        return _cut_selector_part(info, params, hidden)
    n = layout["tokens_per_crop"] if layout.get("layout", "single") == "single" else "tokens"
    grid = token_grid(layout["grid"], n) if isinstance(n, int) else (1, n)
    available = {
        "instruction_embeds": TensorSpec("instruction_embeds", "float32", ("num_images", "instruction", hidden)),
        "instruction_mask": TensorSpec("instruction_mask", "int64", ("num_images", "instruction")),
        "vision_features": TensorSpec("vision_features", "float32", ("num_images", n, vision_width)),
        "cls_attention": TensorSpec("cls_attention", "float32", ("num_images", n)),
        "grid_h": TensorSpec("grid_h", "int64", ()),
        "grid_w": TensorSpec("grid_w", "int64", ()),
    }
    inputs = [
        TensorSpec("image_features", "float32", ("num_images", n, hidden)),
        TensorSpec("keep", "int64", ()),
        *(available[name] for name in info.extra_inputs(params)),
    ]
    outputs = [
        TensorSpec("kept_indices", "int64", ("num_images", "kept")),
        TensorSpec("selected_features", "float32", ("num_images", "kept", hidden)),
    ]
    # every selector graph also merges (the runtime reads these with merge "mean"; selector/merge.py)
    merged = [TensorSpec("merged_features", "float32", ("num_images", "kept", hidden)),
              TensorSpec("kept_sizes", "int64", ("num_images", "kept")),
              TensorSpec("token_groups", "int64", ("num_images", n))] if merge_outputs else []
    tail = add_merge_outputs if merge_outputs else (lambda model: model)
    if target == "trt" and method in PLUGIN_METHODS:
        from ..plugins.onnx_form import plugin_model

        return PartSpec(name="selector", inputs=inputs, outputs=outputs + merged,
                        onnx_model=lambda: tail(plugin_model(params, inputs, outputs)))
    fn, constants = info.onnx_form(params, grid)
    return PartSpec(name="selector", inputs=inputs, outputs=outputs + merged,
                    onnx_model=lambda: tail(build_graph(fn, constants, inputs, outputs)))



def _cut_selector_part(info, params: dict[str, Any], hidden: int) -> PartSpec:
    """An in-LLM selector's graph, run at a decoder cut on the visual tokens still alive there:
    `image_features` are their hidden states entering the next layer, `text_attention` [B, Q, N] the
    cut layer's head-averaged attention from the Q prompt tokens after the image to them,
    `text_features` those prompt tokens' hidden states, `target_features` the alive tokens' states
    after the next layer's post-attention norm (the probe of the segment before the cut: TopV),
    `token_positions` their (row, col) on the patch grid. Selection only: the merge tail belongs to
    the stage before the LLM. A method that also prunes before the LLM exports it as `cut_selector`."""
    from .onnx_graph import build_graph

    extra_inputs, _, onnx_form = info.form("llm")
    available = {"text_attention": TensorSpec("text_attention", "float32", ("num_images", "queries", "tokens")),
                 "text_features": TensorSpec("text_features", "float32", ("num_images", "queries", hidden)),
                 "lam": TensorSpec("lam", "float32", ()),
                 "target_features": TensorSpec("target_features", "float32", ("num_images", "tokens", hidden)),
                 "token_positions": TensorSpec("token_positions", "float32", ("num_images", "tokens", 2))}
    inputs = [TensorSpec("image_features", "float32", ("num_images", "tokens", hidden)),
              TensorSpec("keep", "int64", ()), *(available[name] for name in extra_inputs(params))]
    outputs = [TensorSpec("kept_indices", "int64", ("num_images", "kept")),
               TensorSpec("selected_features", "float32", ("num_images", "kept", hidden))]
    fn, constants = onnx_form(params, (1, 0))
    return PartSpec(name="cut_selector" if info.stage == "both" else "selector", inputs=inputs, outputs=outputs,
                    onnx_model=lambda: build_graph(fn, constants, inputs, outputs))


__all__ = ["PLUGIN_METHODS", "selector_part"]
