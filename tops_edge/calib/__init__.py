"""Precision passes for an export: fp16, INT8 with Q/DQ calibrated on real image + prompt pairs,
weight-only INT8 and INT4. `convert_parts` runs on the exporter's staged fp32 export, part by part.

    part      fp16   int8              int8-wo     int4-wo
    vision    fp16   int8 (Q/DQ)       fp32        fp32
    selector  fp32   fp32              fp32        fp32      (TOPS.md: the selection is computed in fp32)
    embed     fp16   fp32              fp32        fp32      (a lookup: no compute to quantize)
    decoder   fp16   int8 (Q/DQ)       int8-wo     int4-wo   (int8 / blocked int4 weights + DequantizeLinear,
                                                              fp32 activations; a decoder in segments:
                                                              each segment, int8 excepted)

int4-wo's scales are AWQ (searched on the decoder's captured calibration prefills, as int8 captures
them) or round to nearest (`int4_method`, calib/int4.py).

Every graph keeps fp32 inputs and outputs, but fp16 decoders take and give an fp16 KV cache (half the
memory); the runtime allocates the KV cache in the graph's dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .data import CalibrationError, CalibrationSet, calibration_set, default_calibration_set, load_calibration_set

#: what each part becomes at each export precision (parts not named stay fp32)
PART_PLAN = {
    "fp32": {},
    "fp16": {"vision": "fp16", "embed": "fp16", "decoder": "fp16"},
    "int8": {"vision": "int8", "decoder": "int8"},
    "int8-wo": {"decoder": "int8-wo"},
    "int4-wo": {"decoder": "int4-wo"},
}
EXPORT_PRECISIONS = tuple(PART_PLAN)
CALIB_VERSION = 1  # bump when the INT8 settings change: old cache entries stop matching

__all__ = ["EXPORT_PRECISIONS", "PART_PLAN", "CalibrationError", "CalibrationSet",
           "calibration_set", "default_calibration_set", "load_calibration_set", "convert_parts", "cache_dir"]


def cache_dir() -> Path:
    """Calibration ranges live here ($TOPS_EDGE_CACHE, else ~/.cache/tops-edge), under calib/."""
    root = os.environ.get("TOPS_EDGE_CACHE") or Path.home() / ".cache" / "tops-edge"
    return Path(root) / "calib"


def cache_key(manifest: dict, part: str, calib: CalibrationSet) -> str:
    """Model config hash + the fp32 graph's files + calibration data hash + INT8 settings."""
    from .passes import INT8_EXTRA_OPTIONS

    key = {"config": manifest["model"]["config_sha256"], "files": [f["sha256"] for f in manifest["parts"][part]["files"]],
           "calib": calib.digest, "version": CALIB_VERSION, "options": INT8_EXTRA_OPTIONS,
           "keep": [manifest["selector"]["method"], manifest["selector"]["default_keep"],
                    manifest["selector"]["default_keep_ratio"]]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def convert_parts(stage: Path, manifest: dict, precision: str, calib=None, progress: bool = False,
                  int4_method: str | None = None) -> dict[str, dict]:
    """Rewrite the staged fp32 graphs at `precision`; returns {part: {"files": [...], "precision": p}}
    for the parts it changed (int4-wo parts also record "int4": {"method", "block_size"}). `calib`: a
    folder, a CalibrationSet or None (the built-in set), for int8 and int4-wo's AWQ. `int4_method`:
    awq or rtn (int4-wo only; default calib/int4.py DEFAULT_INT4_METHOD)."""
    from tqdm.auto import tqdm

    from ..export.manifest import file_record
    from ..export.onnx_export import save_graph
    from . import passes

    # a decoder cut into segments (decoder.0, decoder.1, ...): each segment as the decoder
    plan = {part: PART_PLAN[precision][part.split(".")[0]] for part in manifest["parts"]
            if part.split(".")[0] in PART_PLAN[precision]}
    feeds: dict[str, list] = {}
    from .int4 import BLOCK_SIZE, DEFAULT_INT4_METHOD

    int4_method = int4_method or DEFAULT_INT4_METHOD
    needs_feeds = "int8" in plan.values() or ("int4-wo" in plan.values() and int4_method == "awq")
    calib_set = calibration_set(calib) if needs_feeds else None

    def feeds_of(part):
        if not feeds:  # one fp32 pipeline pass serves every part, and only on a cache miss
            from .capture import capture

            feeds.update(capture(stage, manifest, calib_set, progress))
        return feeds[part]

    changed = {}
    bar = tqdm(plan.items(), desc=f"tops-export: {precision}", unit="part", disable=not progress, leave=False)
    for part, part_precision in bar:
        bar.set_postfix_str(part)
        graph = stage / manifest["parts"][part]["files"][0]["path"]
        raw = stage / f".{part}.{part_precision}.onnx"
        try:
            fp16_io = []
            if part_precision == "fp16":
                fp16_io = passes.to_fp16(graph, raw)
            elif part_precision == "int8-wo":
                passes.to_int8_weight_only(graph, raw)
            elif part_precision == "int4-wo":
                from .int4 import to_int4_weight_only

                to_int4_weight_only(graph, raw, int4_method, lambda part=part: feeds_of(part))
            else:
                cache = cache_dir() / f"{part}-{cache_key(manifest, part, calib_set)}.json"
                passes.to_int8(graph, raw, lambda part=part: feeds_of(part), cache)
            for f in manifest["parts"][part]["files"]:
                (stage / f["path"]).unlink()
            names = save_graph(raw, graph)
        finally:
            for leftover in (raw, stage / (raw.name + ".data")):
                leftover.unlink(missing_ok=True)
        changed[part] = {"files": [file_record(stage, n) for n in names], "precision": part_precision}
        if part_precision == "int4-wo":
            changed[part]["int4"] = {"method": int4_method, "block_size": BLOCK_SIZE}
        for side in ("inputs", "outputs"):  # the IO that became fp16 (the KV cache) says so
            changed[part][side] = [dict(spec, dtype="float16") if spec["name"] in fp16_io else spec
                                   for spec in manifest["parts"][part][side]]
    bar.close()
    return changed
