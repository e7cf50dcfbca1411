"""`tops-export`'s engine: model -> ONNX parts + preprocessing files + manifest, written atomically."""

from __future__ import annotations

import gc
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, selector as selectors
from ..calib import EXPORT_PRECISIONS
from ..errors import InputError
from ..models import ModelAdapter, load
from ..models.base import config_sha256
from ..runtime.layout import BUDGETS, POSITIONS
from ..selector.merge import MERGES
from ..selector.methods import probe_cuts, refuse_layout
from ..selector.parts import selector_part
from .atomic import staged_directory
from .manifest import SCHEMA_VERSION, file_record, write_manifest
from .onnx_export import EXPORTERS, export_part, opset_default

PRECISIONS = EXPORT_PRECISIONS  # calib/__init__.py: what each part becomes at each
TARGETS = ("ort", "trt")
DEFAULT_EXPORTER = "legacy"  # measured: see docs/design.md "Exporter choice"


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
    positions: str | None = None,
    merge: str | None = None,
    selector_params: dict[str, Any] | None = None,
    progress: bool = True,
    device: str | None = None,
    calib=None,
    cuts=None,
    int4_method: str | None = None,
    max_image_tokens: int | None = None,
    lm_head_chunks: int | None = None,
) -> Path:
    """Export MODEL into OUT. Returns OUT. A failure leaves an existing OUT untouched.

    `keep` (tokens) or `keep_ratio` (a fraction of each image's tokens) is the default budget
    recorded in the manifest (the runtime may change it per call); neither means every visual token.
    `budget` splits it over an anyres image's crops: `proportional` (per crop, in proportion to its
    tokens) or `global` (one selection over the whole image). `selector_params` override the
    method's defaults (e.g. alpha, beta, relevance_sign, similarity for dpp-merge; seed for random).
    `merge` is recorded for the runtime: `mean` merges each dropped visual token into its most
    similar kept one (proportional attention, selector/merge.py), `none` only selects; default: the
    method's own (dpp-merge and the other pre-LLM baselines merge, tops does not: the paper has none).
    `device` (a plan/devices.py preset) refuses, before any export work, a model that would not fit
    that device at `precision`. `calib` (int8, int4-wo with AWQ): a folder of images + prompts.jsonl, or a
    calib.CalibrationSet; default: the built-in ShapesVQA pairs. `cuts` (decoder layers) exports the
    decoder in segments cut before those layers, so selectors can prune inside the LLM there
    (models/base.py DecoderSegment); default: the cuts of the selector's own plan at the default
    budget (none for the methods that prune before the LLM). Where the selector's graph at a cut
    reads the next layer's post-attention states (topv's target_features), the segment ending at
    that cut also outputs them (`cut_target_features`; manifest `decoder.segments[i].probe`).
    `int4_method` (int4-wo only): awq (scales searched on the calibration prefills, which `calib`
    then supplies) or rtn (round to nearest); default awq (calib/int4.py). `positions`: compact or
    original (default compact; Qwen-VL's M-RoPE takes original only). `max_image_tokens` (Qwen-VL):
    caps each image's visual tokens by lowering the image processor's max_pixels. `lm_head_chunks`:
    the LM head as that many MatMuls over consecutive vocabulary slices (the same logits; for TensorRT
    builds whose workspace one vocabulary-wide GEMM would exceed); default: what the `device` plan
    asks for (plan/memory.py lm_head_chunks), else 1.
    """
    from ..calib.int4 import DEFAULT_INT4_METHOD, INT4_METHODS

    _check_choice("precision", precision, PRECISIONS)
    if int4_method is not None:
        if precision != "int4-wo":
            raise InputError("--int4-method chooses int4-wo's scales: it needs --precision int4-wo")
        _check_choice("int4-method", int4_method, INT4_METHODS)
    if calib is not None and not (precision == "int8" or (precision == "int4-wo" and (int4_method or DEFAULT_INT4_METHOD) == "awq")):
        raise InputError("--calib calibrates INT8 activations or int4-wo's AWQ scales: it needs --precision int8 or int4-wo")
    if calib is not None:
        from ..calib import calibration_set

        calib = calibration_set(calib)  # a bad folder fails here, before any export work
    _check_choice("target", target, TARGETS)
    if positions is not None:
        _check_choice("positions", positions, POSITIONS)
    _check_choice("exporter", exporter, EXPORTERS)
    _check_choice("budget", budget, BUDGETS)
    if keep is not None and keep_ratio is not None:
        raise InputError("pass --keep or --keep-ratio, not both")
    if keep_ratio is not None:
        selectors.check_keep_ratio(keep_ratio)
    info = selectors.get(selector)
    merge = info.merge if merge is None else merge
    _check_choice("merge", merge, MERGES)
    params = info.resolve_params(selector_params)
    info.extra_inputs(params)  # validates choices such as `similarity` before any work
    opset = opset or opset_default()
    if lm_head_chunks is not None and (isinstance(lm_head_chunks, bool) or int(lm_head_chunks) < 1):
        raise InputError(f"--lm-head-chunks must be at least 1, got {lm_head_chunks}")

    from tqdm.auto import tqdm

    steps = tqdm(total=2, desc="tops-export", unit="step", disable=not progress, leave=False)
    try:
        steps.set_postfix_str("loading model")
        adapter = model if isinstance(model, ModelAdapter) else load(model)
        steps.update()
        if positions is None:
            positions = "original" if adapter.position_rows == 3 else "compact"
        adapter.check_positions(positions)
        if max_image_tokens is not None:
            adapter.cap_image_tokens(max_image_tokens)
        layout = adapter.visual_layout()
        refuse_layout(selector, params, layout.get("layout", "single"))
        n = layout["max_selectable"]
        if not info.prunes:
            if keep not in (None, n) or keep_ratio not in (None, 1.0):
                raise InputError("--selector none keeps every visual token; pass a --selector to export a budget")
            keep, keep_ratio = None, None
        elif keep is not None:
            keep = selectors.check_keep(keep, n)
        # the [CLS] attention costs one row of one layer's attention: always exported, so the runtime
        # can switch to the `attention` selector (Pipeline.use_selector) without re-exporting
        if cuts is None:
            cuts = default_cuts(selector, params, adapter.num_layers)
        cuts = adapter.check_cuts(cuts)
        if cuts and precision == "int8":
            raise InputError("--precision int8 calibrates one decoder graph; a decoder cut at --cuts "
                             f"{','.join(map(str, cuts))} takes fp32, fp16, int8-wo or int4-wo in this version")
        # the next layer's probe, only before the cuts whose selector reads it (no cost elsewhere)
        probes = tuple(c for c in probe_cuts(selector, params, adapter.num_layers) if c in cuts)
        from ..plan import footprint_of
        from ..plan.footprint import with_probes

        footprint = with_probes(footprint_of(adapter), adapter, probes)  # a probe copies one layer's attention
        from ..plan.memory import vocabulary_chunks

        if device is not None:
            from ..plan import check_fits, get_preset

            plan = check_fits(footprint, get_preset(device), precision, adapter.source)
            if lm_head_chunks is None:
                lm_head_chunks = plan.head_chunks
        head_rows = vocabulary_chunks(adapter.text_config.vocab_size, int(lm_head_chunks or 1))
        parts = adapter.parts(cls_attention=True, cuts=cuts, probes=probes)
        if len(head_rows) > 1:
            _split_lm_head(parts, head_rows)
        vision_width = next(o for o in parts[0].outputs if o.name == "vision_features").shape[-1]
        sel = selector_part(selector, params, layout, adapter.hidden_size, vision_width, target)
        if sel is not None:
            parts.insert(1, sel)
        if info.stage == "both":  # its graph at the decoder's cuts too
            parts.insert(2, selector_part(selector, params, layout, adapter.hidden_size, vision_width, target, at="llm"))
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
                                 exporter, positions, merge, cuts, probes)
            manifest["target"] = target
            manifest["decoder"]["lm_head_chunks"] = head_rows  # rows per LM-head MatMul (one entry: unsplit)
            manifest["footprint"] = footprint.to_json()  # the memory planner's input (tops-build)
            write_manifest(stage, manifest)
            if precision != "fp32":  # the passes read the fp32 export (int8 runs its pipeline to calibrate)
                from ..calib import convert_parts

                # the torch model is not needed past here: a model loaded here is released before the
                # passes, so its fp32 weights and the passes' copies are not in host RAM together
                del parts, part, sel  # `part` too: the loop leaves the last one (the decoder) bound
                if not isinstance(model, ModelAdapter):
                    del adapter
                gc.collect()

                steps.set_postfix_str(f"converting to {precision}")
                for name, changed in convert_parts(stage, manifest, precision, calib, progress, int4_method).items():
                    records[name].update(changed)
                first_segment = manifest["decoder"]["segments"][0]["part"]
                manifest["decoder"]["kv_dtype"] = next(s["dtype"] for s in records[first_segment]["inputs"]
                                                       if s["name"].startswith("past_key_values."))
                write_manifest(stage, manifest)
            steps.update()
    finally:
        steps.close()
    return out


def _split_lm_head(parts, rows: list[int]) -> None:
    """The decoder segment that returns logits computes its LM head in vocabulary chunks."""
    from ..models.base import ChunkedLMHead, DecoderSegment

    for part in parts:
        if isinstance(part.module, DecoderSegment) and part.module.returns_logits:
            part.module.lm_head = ChunkedLMHead(part.module.lm_head, rows)


def _segments(cuts, num_layers: int) -> list[tuple[str, int, int]]:
    """(part name, first layer, end layer) of each decoder segment, as models/base.py names them."""
    bounds = [0, *cuts, num_layers]
    return [("decoder" if len(bounds) == 2 else f"decoder.{i}", a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def default_cuts(method: str, params: dict, num_layers: int) -> tuple[int, ...]:
    """The cuts the selector's own schedule prunes at, whatever the budget (none before the LLM)."""
    from ..selector.plan import cut_layers

    return cut_layers(method, params, num_layers) if selectors.get(method).prunes else ()


def _check_choice(flag: str, value: str, allowed, later: str = "") -> None:
    if value not in allowed:
        hint = f" ({later})" if later else ""
        raise InputError(f"--{flag} {value} is not available in this version; choose {', '.join(allowed)}{hint}")


def _manifest(adapter, layout, records, arrays, selector, params, budget_spec, precision, opset, exporter,
              positions, merge, cuts, probes=()) -> dict[str, Any]:
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
        "selector": {"method": selector, "params": params, **budget_spec, "positions": positions, "merge": merge,
                     "stage": selectors.get(selector).stage},
        "decoder": {
            # segment i holds layers [bounds[i], bounds[i+1]); one segment named `decoder` when uncut;
            # `probe`: true on a segment that also outputs cut_target_features (absent: it does not)
            "cuts": list(cuts),
            "segments": [{"part": name, "layers": [first, last], **({"probe": True} if last in probes else {})}
                         for name, first, last in _segments(cuts, adapter.num_layers)],
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
