"""`tops-build DIR --device X [--precision fp16|int8]`: one engine per part, driven by the manifest.

Thin over polygraphy (TensorRT's own loaders): NetworkFromOnnxPath -> CreateConfig(profiles, fp16 /
int8, workspace, builder optimization level, timing cache) -> engine, written atomically beside the
graphs and recorded in ENGINES_NAME (the manifest itself stays device-independent). The memory plan
is checked first, with the same one-line refusal as `tops-export --device`.

- fp16: every part but the selector; the selector is built in fp32 with TF32 off (TOPS.md: the
  selection is computed in fp32 whatever the model's dtype, and TF32 would change the picks).
- int8: needs an export with Q/DQ graphs (`tops-export --precision int8`, or `int8-wo`: weight-only
  DequantizeLinear in the decoder); TensorRT reads the scales from the graph (explicit quantization;
  implicit INT8 calibrators are deprecated since 10.1); the layers outside Q/DQ build in fp16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..export.manifest import load_manifest, sha256_file
from ..plan import check_fits, format_plan, get_preset, plan_memory
from ..plan.build import format_build, plan_build
from ..plan.footprint import footprint_from_manifest
from ..plan.profiles import format_profiles, optimization_profiles
from .tensorrt_import import require_tensorrt

BUILD_PRECISIONS = ("fp16", "int8")
ENGINES_NAME = "engines.json"
FP32_PARTS = ("selector",)
QDQ_EXPORTS = ("int8", "int8-wo", "int4-wo")  # tops-export precisions whose graphs carry Q/DQ (calib/)


def kv_bytes_of(manifest: dict) -> int:
    """The KV cache's element size: the engines keep the export's KV IO dtype (fp16 exports: fp16, else fp32)."""
    return {"float32": 4, "float16": 2}.get(manifest["decoder"].get("kv_dtype", "float32"), 4)


def describe_build(directory, device: str, precision: str) -> str:
    """The memory plan and the profiles a build would use (tops-build --dry-run); needs no TensorRT."""
    manifest = load_manifest(directory, verify="none")
    preset = get_preset(device)
    if precision == "int8" and manifest["precision"] in QDQ_EXPORTS:
        precision = manifest["precision"]  # int8-wo: int8 decoder weights only
    plan = plan_memory(footprint_from_manifest(manifest), preset, precision, manifest["model"]["source"],
                       kv_bytes=kv_bytes_of(manifest))
    head = head_warning(manifest, plan)
    build = plan_build(footprint_from_manifest(manifest), preset, precision, manifest["precision"])
    return "\n".join([format_plan(plan), *segment_kv_lines(manifest, plan.context, kv_bytes_of(manifest)),
                      *([head] if head else []), format_build(build),
                      format_profiles(optimization_profiles(manifest, preset))])


def head_warning(manifest: dict, plan) -> str | None:
    """A line when the export's LM head is split into fewer vocabulary chunks than the plan asks for
    on this device (plan/memory.py lm_head_chunks: an estimate, so a warning, not a refusal)."""
    dec = manifest["decoder"]
    have = len(dec.get("lm_head_chunks", [dec["vocab_size"]]))
    if have >= plan.head_chunks:
        return None
    return (f"warning: this export computes its LM head as {have} MatMul(s); on {plan.device.name} the planner "
            f"estimates ~{plan.head_workspace / 2**30:.2f} GiB of workspace for it and asks for {plan.head_chunks} "
            f"(re-export with tops-export --device {plan.device.name}, or --lm-head-chunks {plan.head_chunks})")


def segment_kv_lines(manifest: dict, context: int, kv_bytes: int) -> list[str]:
    """A decoder in segments: each segment's share of the plan's KV row. Each engine allocates its own
    cache, sized (as the plan is) for a full-context prompt: the worst case, which no cut lowers,
    since a long text prompt fills every segment alike. Nothing for an uncut decoder."""
    dec = manifest["decoder"]
    if len(dec["segments"]) < 2:
        return []
    per_layer = 2 * dec["num_kv_heads"] * dec["head_dim"] * kv_bytes * context  # 1 buffer x K, V (plan/memory.py)
    lines = [f"KV cache per decoder segment (cut at {','.join(map(str, dec['cuts']))}; each up to {context} tokens):"]
    for seg in dec["segments"]:
        first, last = seg["layers"]
        lines.append(f"  {seg['part']:<12} layers {first}-{last - 1}  {(last - first) * per_layer / 2**20:10.1f} MiB")
    return lines


def build_engines(directory, device: str, precision: str = "fp16", timing_cache: str | None = None,
                  log: Callable[[str], None] = lambda msg: None, warn: Callable[[str], None] | None = None) -> Path:
    """Build every part's engine into DIR and write DIR/engines.json; returns its path. `log` gets
    the progress lines, `warn` (default: `log`) the warnings."""
    directory = Path(directory)
    if precision not in BUILD_PRECISIONS:
        raise InputError(f"--precision {precision} cannot be built; choose {', '.join(BUILD_PRECISIONS)}")
    manifest = load_manifest(directory)
    preset = get_preset(device)
    qdq = manifest["precision"] in QDQ_EXPORTS
    if precision == "int8" and not qdq:
        raise InputError(f"--precision int8 builds from Q/DQ graphs, but {directory} was exported at {manifest['precision']}; "
                         "re-export with tops-export --precision int8 (or int8-wo)")
    if precision != "int8" and qdq:
        raise InputError(f"{directory} holds Q/DQ graphs ({manifest['precision']}): build it with --precision int8")
    plan_precision = manifest["precision"] if qdq else precision  # int8-wo: int8 decoder weights only
    plan = check_fits(footprint_from_manifest(manifest), preset, plan_precision, manifest["model"]["source"],
                      kv_bytes=kv_bytes_of(manifest))
    head = head_warning(manifest, plan)
    if head:
        (warn or log)(head)
    trt = require_tensorrt("tops-build")
    if manifest.get("target") == "trt" and "selector" in manifest["parts"]:
        from .. import plugins

        plugins.load()
    profiles = optimization_profiles(manifest, preset)
    cache = Path(timing_cache) if timing_cache else directory / "timing.cache"
    engines = {}
    for part, record in manifest["parts"].items():
        onnx_path = directory / record["files"][0]["path"]
        engine_path = directory / f"{part}.{device}.{precision}.engine"
        log(f"building {part} ({'fp32' if part in FP32_PARTS else precision}) from {onnx_path.name}")
        _build_one(trt, onnx_path, engine_path, profiles[part], preset, precision, part in FP32_PARTS, cache)
        engines[part] = {"path": engine_path.name, "bytes": engine_path.stat().st_size, "sha256": sha256_file(engine_path)}
    record = {"device": device, "precision": precision, "tensorrt": trt.__version__, "timing_cache": str(cache),
              "context": min(preset.max_context, int(manifest["decoder"]["max_context"])), "engines": engines}
    out = directory / ENGINES_NAME
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    log(f"wrote {out}")
    return out


def _build_one(trt, onnx_path: Path, engine_path: Path, profile: dict, preset, precision: str, fp32: bool, cache: Path) -> None:
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    trt_profile = Profile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.add(name, min=lo, opt=opt, max=hi)
    config = CreateConfig(
        fp16=not fp32 and precision in ("fp16", "int8"),
        int8=not fp32 and precision == "int8",
        tf32=False,
        profiles=[trt_profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: preset.workspace_bytes},
        builder_optimization_level=preset.builder_optimization_level,
        load_timing_cache=str(cache) if cache.exists() else None,
    )
    build = EngineBytesFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config, save_timing_cache=str(cache))
    data = build()  # TensorRT's serialized engine (IHostMemory): written as it is, not copied into bytes first
    tmp = engine_path.with_suffix(".engine.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    del data
    os.replace(tmp, engine_path)  # a failed build never leaves a half-written engine under the real name


def read_engines(directory) -> dict:
    """DIR/engines.json, or an error saying to run tops-build."""
    path = Path(directory) / ENGINES_NAME
    if not path.is_file():
        raise InputError(f"{directory} has no {ENGINES_NAME}: build engines on this device first (tops-build {directory} --device ...)")
    return json.loads(path.read_text())
