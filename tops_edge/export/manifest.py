"""`manifest.json`: the one contract between export and runtime. Versioned, validated on load.

Everything the runtime needs is here or in the HF preprocessing files beside it, so the runtime never
imports a model adapter or touches torch weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ManifestError

SCHEMA_VERSION = 7  # 2: visual layouts (single | anyres), arrays, keep ratio and budget split; 3: parts' precision;
# 4: the decoder's attention_bias input and selector.merge; 5: the decoder's fixed-size KV cache (cache_position);
# 6: the decoder in segments (decoder.cuts, decoder.segments), selector.stage, the selectors' token_groups
# (6 also: a segment's optional `probe: true`, its extra cut_target_features output; absent means none,
# so manifests written before it read as they did); 7: the decoder's present.{i}.* are only the step's new rows
# [B, H, S, D] (the runtime writes them into its one KV buffer per tensor): a runtime of 6 cannot run these graphs
MANIFEST_NAME = "manifest.json"

# key -> type the loader insists on; nested parts are checked separately
_REQUIRED = {
    "schema_version": int,
    "tops_edge_version": str,
    "model": dict,
    "visual": dict,
    "selector": dict,
    "decoder": dict,
    "parts": dict,
    "arrays": dict,
    "precision": str,
    "opset": int,
    "exporter": str,
    "tools": dict,
}
_REQUIRED_PARTS = ("vision", "embed")  # and every part decoder.segments names
_REQUIRED_VISUAL = ("layout", "tokens_per_crop", "max_tokens", "max_selectable", "grid", "image_token_id")
_REQUIRED_SELECTOR = ("method", "params", "default_keep", "default_keep_ratio", "budget", "positions", "merge", "stage")
PART_PRECISIONS = ("fp32", "fp16", "int8", "int8-wo", "int4-wo")  # a graph's precision (calib/__init__.py: which part gets which)
_REQUIRED_DECODER = ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "max_context", "eos_token_ids",
                     "cuts", "segments")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(directory: Path, name: str) -> dict[str, Any]:
    path = directory / name
    return {"path": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(directory: str | os.PathLike, verify: str = "fast") -> dict[str, Any]:
    """Read and validate DIR/manifest.json.

    verify: "fast" hashes every .onnx graph and checks the size of external-data files (a truncated
    or edited graph is caught without reading gigabytes of weights); "full" hashes everything;
    "none" only checks the schema.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ManifestError(f"{directory} is not a directory; pass the --out DIR of tops-export")
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST_NAME}; is it a tops-export output directory?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema version {version!r}, this tops-edge reads version {SCHEMA_VERSION}; re-export with tops-export"
        )
    for key, typ in _REQUIRED.items():
        if not isinstance(manifest.get(key), typ):
            raise ManifestError(f"{path}: field '{key}' is missing or not a {typ.__name__}")
    _require(path, "visual", manifest["visual"], _REQUIRED_VISUAL)
    _require(path, "decoder", manifest["decoder"], _REQUIRED_DECODER)
    _require(path, "selector", manifest["selector"], _REQUIRED_SELECTOR)
    parts = manifest["parts"]
    _check_segments(path, manifest["decoder"])
    for name in (*_REQUIRED_PARTS, *(seg["part"] for seg in manifest["decoder"]["segments"])):
        if name not in parts:
            raise ManifestError(f"{path}: part '{name}' is missing")
    for name, part in parts.items():
        if not isinstance(part, dict) or part.get("precision") not in PART_PRECISIONS:
            raise ManifestError(f"{path}: part '{name}' has no precision (one of {', '.join(PART_PRECISIONS)})")
    if verify != "none":
        for name, part in parts.items():
            _verify_part(directory, name, part, full=(verify == "full"))
        for name, record in manifest["arrays"].items():  # small: always hashed
            _verify_part(directory, name, {"files": [record]}, full=True)
    return manifest


def _check_segments(path: Path, decoder: dict) -> None:
    """The segments tile layers 0..L-1 in order, split exactly at the cuts."""
    segments, cuts, n = decoder["segments"], decoder["cuts"], decoder["num_layers"]
    bounds = [0, *cuts, n]
    if not isinstance(segments, list) or len(segments) != len(bounds) - 1 or any(
            not isinstance(seg, dict) or seg.get("layers") != [a, b] or not isinstance(seg.get("part"), str)
            for seg, a, b in zip(segments, bounds, bounds[1:])):
        raise ManifestError(f"{path}: decoder.segments do not split layers 0..{n} at the cuts {cuts}")
    for seg in segments[:-1]:
        if not isinstance(seg.get("probe", False), bool):
            raise ManifestError(f"{path}: decoder segment '{seg['part']}' has a probe that is not true or false")
    if segments[-1].get("probe", False):
        raise ManifestError(f"{path}: the last decoder segment '{segments[-1]['part']}' ends at no cut and has no probe")


def _require(path: Path, section: str, data: dict, keys) -> None:
    for key in keys:
        if key not in data:
            raise ManifestError(f"{path}: field '{section}.{key}' is missing")


def _verify_part(directory: Path, name: str, part: dict, full: bool) -> None:
    files = part.get("files")
    if not isinstance(files, list) or not files:
        raise ManifestError(f"{directory / MANIFEST_NAME}: part '{name}' lists no files")
    for rec in files:
        path = directory / rec["path"]
        if not path.is_file():
            raise ManifestError(f"{path} is missing (part '{name}'); re-export with tops-export")
        if path.stat().st_size != rec["bytes"]:
            raise ManifestError(
                f"{path} is {path.stat().st_size} bytes, the manifest says {rec['bytes']}: truncated or replaced; re-export"
            )
        if (full or path.suffix == ".onnx") and sha256_file(path) != rec["sha256"]:
            raise ManifestError(f"{path} does not match its sha256 in the manifest: modified or corrupt; re-export")
