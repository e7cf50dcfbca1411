"""`tops-export`'s engine: model -> ONNX parts + preprocessing files + manifest, written atomically."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, selector as selectors
from ..calib import EXPORT_PRECISIONS
from ..errors import ExportError, InputError
from ..models import ModelAdapter, PartSpec, TensorSpec, load
from ..models.base import config_sha256
from ..runtime.layout import BUDGETS
from ..selector.merge import MERGES, add_merge_outputs
from .atomic import staged_directory
from .manifest import SCHEMA_VERSION, file_record, write_manifest
from .onnx_export import EXPORTERS, export_part, opset_default

PRECISIONS = EXPORT_PRECISIONS  # calib/__init__.py: what each part becomes at each
POSITIONS = ("compact", "original")
TARGETS = ("ort", "trt")
PLUGIN_METHODS = ("tops", "cdpruner")  # --target trt: these run as the tops::Select TensorRT plugin
DEFAULT_EXPORTER = "legacy"  # measured: see docs/design.md "Exporter choice"


def selector_part(method: str, params: dict[str, Any], layout: dict[str, Any], hidden: int, vision_width: int,
                  target: str = "ort", merge_outputs: bool = True) -> PartSpec | None:
    """The selector graph for `method` from its registered ONNX form (with `target` trt, the plugin
    form for PLUGIN_METHODS); None for `none`. It also outputs the token merge of its selection
    (`merged_features`, `kept_sizes`, `token_groups`; selector/merge.py) unless `merge_outputs` is False (timing).

    The graph selects within one segment: a whole image (`single` layout, N fixed) or one crop or the
    whole of an anyres image (N dynamic). Spatial methods get the segment's grid as inputs.
    """
    from ..selector.onnx_graph import build_graph

    info = selectors.get(method)
    if not info.prunes:
        return None
    n = layout["tokens_per_crop"] if layout.get("layout", "single") == "single" else "tokens"
    grid = selectors.token_grid(layout["grid"], n) if isinstance(n, int) else (1, n)
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


def export_model(
    model: str | ModelAdapter,
    out: str | Path,
    selector: str = "none",
    keep: int | None = None,
    keep_ratio: float | None = None,
    budget: str = "proportional",
    precision: str = "fp32",
    target: str = "ort",
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    positions: str = "compact",
    merge: str = "mean",
    selector_params: dict[str, Any] | None = None,
    progress: bool = True,
    device: str | None = None,
    calib=None,
) -> Path:
    """Export MODEL into OUT. Returns OUT. A failure leaves an existing OUT untouched.

    `keep` (tokens) or `keep_ratio` (a fraction of each image's tokens) is the default budget
    recorded in the manifest (the runtime may change it per call); neither means every visual token.
    `budget` splits it over an anyres image's crops: `proportional` (per crop, in proportion to its
    tokens) or `global` (one selection over the whole image). `selector_params` override the
    method's defaults (e.g. alpha, beta, relevance_sign, similarity for tops; seed for random).
    `merge` is recorded for the runtime: `mean` merges each dropped visual token into its most
    similar kept one (proportional attention, selector/merge.py), `none` only selects.
    `device` (a plan/devices.py preset) refuses, before any export work, a model that would not fit
    that device at `precision`. `calib` (int8 only): a folder of images + prompts.jsonl, or a
    calib.CalibrationSet; default: the built-in ShapesVQA pairs.
    """
    _check_choice("precision", precision, PRECISIONS)
    if calib is not None and precision != "int8":
        raise InputError("--calib calibrates INT8 activations: it needs --precision int8")
    if calib is not None:
        from ..calib import calibration_set

        calib = calibration_set(calib)  # a bad folder fails here, before any export work
    _check_choice("target", target, TARGETS)
    _check_choice("positions", positions, POSITIONS)
    _check_choice("merge", merge, MERGES)
    _check_choice("exporter", exporter, EXPORTERS)
    _check_choice("budget", budget, BUDGETS)
    if keep is not None and keep_ratio is not None:
        raise InputError("pass --keep or --keep-ratio, not both")
    if keep_ratio is not None:
        selectors.check_keep_ratio(keep_ratio)
    info = selectors.get(selector)
    params = info.resolve_params(selector_params)
    info.extra_inputs(params)  # validates choices such as `similarity` before any work
    opset = opset or opset_default()

    from tqdm.auto import tqdm

    steps = tqdm(total=2, desc="tops-export", unit="step", disable=not progress, leave=False)
    try:
        steps.set_postfix_str("loading model")
        adapter = model if isinstance(model, ModelAdapter) else load(model)
        steps.update()
        layout = adapter.visual_layout()
        n = layout["max_selectable"]
        from ..plan import footprint_of

        footprint = footprint_of(adapter)
        if device is not None:
            from ..plan import check_fits, get_preset

            check_fits(footprint, get_preset(device), precision, adapter.source)
        if not info.prunes:
            if keep not in (None, n) or keep_ratio not in (None, 1.0):
                raise InputError("--selector none keeps every visual token; pass a --selector to export a budget")
            keep, keep_ratio = None, None
        elif keep is not None:
            keep = selectors.check_keep(keep, n)
        # the [CLS] attention costs one row of one layer's attention: always exported, so the runtime
        # can switch to the `attention` selector (Pipeline.use_selector) without re-exporting
        parts = adapter.parts(cls_attention=True)
        vision_width = next(o for o in parts[0].outputs if o.name == "vision_features").shape[-1]
        sel = selector_part(selector, params, layout, adapter.hidden_size, vision_width, target)
        if sel is not None:
            parts.insert(1, sel)
        steps.total = len(parts) + 2  # load, each part, preprocessing + manifest
        steps.refresh()
        out = Path(out)
        with staged_directory(out) as stage:
            records = {}
            for part in parts:
                steps.set_postfix_str(f"exporting {part.name}")
                files = export_part(part, stage / f"{part.name}.onnx", opset=opset, exporter=exporter)
                records[part.name] = {
                    "files": [file_record(stage, f) for f in files],
                    "inputs": [s.to_json() for s in part.inputs],
                    "outputs": [s.to_json() for s in part.outputs],
                    "precision": "fp32",
                }
                steps.update()
            steps.set_postfix_str("writing preprocessing + manifest")
            adapter.save_preprocessing(stage)
            arrays = {}
            for name, array in adapter.layout_arrays().items():
                np.save(stage / f"{name}.npy", np.ascontiguousarray(array, dtype=np.float32))
                arrays[name] = file_record(stage, f"{name}.npy")
            budget_spec = {"default_keep": keep, "default_keep_ratio": keep_ratio, "budget": budget}
            manifest = _manifest(adapter, layout, records, arrays, selector, params, budget_spec, precision, opset,
                                 exporter, positions, merge)
            manifest["target"] = target
            manifest["footprint"] = footprint.to_json()  # the memory planner's input (tops-build)
            write_manifest(stage, manifest)
            if precision != "fp32":  # the passes read the fp32 export (int8 runs its pipeline to calibrate)
                from ..calib import convert_parts

                steps.set_postfix_str(f"converting to {precision}")
                for name, changed in convert_parts(stage, manifest, precision, calib, progress).items():
                    records[name].update(changed)
                manifest["decoder"]["kv_dtype"] = next(s["dtype"] for s in records["decoder"]["inputs"]
                                                       if s["name"].startswith("past_key_values."))
                write_manifest(stage, manifest)
            steps.update()
    finally:
        steps.close()
    return out


def _check_choice(flag: str, value: str, allowed, later: str = "") -> None:
    if value not in allowed:
        hint = f" ({later})" if later else ""
        raise InputError(f"--{flag} {value} is not available in this version; choose {', '.join(allowed)}{hint}")


def _manifest(adapter, layout, records, arrays, selector, params, budget_spec, precision, opset, exporter,
              positions, merge) -> dict[str, Any]:
    import onnx
    import transformers

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # export does not need it; the runtime does
        ort_version = None
    tc = adapter.text_config
    return {
        "schema_version": SCHEMA_VERSION,
        "tops_edge_version": __version__,
        "model": {
            "source": adapter.source,
            "family": adapter.family,
            "model_type": adapter.config.model_type,
            "config_sha256": config_sha256(adapter.config),
        },
        "visual": layout,
        "selector": {"method": selector, "params": params, **budget_spec, "positions": positions, "merge": merge},
        "decoder": {
            "num_layers": adapter.num_layers,
            "num_kv_heads": adapter.num_kv_heads,
            "head_dim": adapter.head_dim,
            "hidden_size": adapter.hidden_size,
            "vocab_size": tc.vocab_size,
            "max_context": adapter.max_context,
            "eos_token_ids": adapter.eos_token_ids,
            "kv_dtype": "float32",
            "logits": "last_position",
        },
        "parts": records,
        "arrays": arrays,
        "precision": precision,
        "opset": opset,
        "exporter": exporter,
        "tools": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort_version,
            "python": platform.python_version(),
        },
    }
