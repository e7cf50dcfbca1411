"""Model families and how a `--model` string becomes an adapter.

MODEL may be a built-in model (no download: a random-weight tiny model built in code, or a trained
checkpoint shipped as package data), a short alias, a local HF-format directory, or a hub id that is
in the Hugging Face cache (or downloadable, when the machine is online).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from ..errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from .base import ModelAdapter, PartSpec, TensorSpec
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter)

#: trained checkpoints installed with the package (tops_edge/assets/NAME, HF format, with a SHA256SUMS)
CHECKPOINTS = ("shapes-llava", "shapes-llava-deep", "shapes-llava-next")


def builtin_models() -> list[str]:
    return [*CHECKPOINTS, *(name for a in ADAPTERS for name in a.tiny_names)]


def checkpoint_dir(name: str) -> Path:
    """The folder of a shipped checkpoint (tops_edge/assets/NAME), its files checked."""
    from importlib.resources import files

    return verify_checkpoint(Path(str(files("tops_edge") / "assets" / name)), name)


def verify_checkpoint(path: Path, name: str) -> Path:
    """PATH, after checking every file its SHA256SUMS names; a mismatch is a CorruptModelError."""
    sums = path / "SHA256SUMS"
    if not sums.is_file():
        raise CorruptModelError(f"built-in model '{name}' is missing from this installation ({path}): reinstall tops-edge")
    for line in sums.read_text().splitlines():
        digest, filename = line.split()
        file = path / filename
        actual = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None
        if actual != digest:
            found = "the file is missing" if actual is None else f"found {actual[:12]}..."
            raise CorruptModelError(f"built-in model '{name}': {filename} does not match its sha256 in {sums} "
                                    f"({found}): reinstall tops-edge")
    return path


def aliases() -> dict[str, str]:
    return {k: v for a in ADAPTERS for k, v in a.aliases.items()}


def adapter_for_model_type(model_type: str) -> type[ModelAdapter]:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    known = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise UnsupportedModelError(f"model type '{model_type}' is not supported (supported: {known})")


def load(spec: str, seed: int = 0) -> ModelAdapter:
    """Resolve MODEL and load it in fp32 on the CPU, with its processor."""
    for adapter in ADAPTERS:
        if spec in adapter.tiny_names:
            return adapter.build_tiny(spec, seed=seed)
    if spec in CHECKPOINTS:
        return _load_local(checkpoint_dir(spec), source=spec)
    hub_id = aliases().get(spec.lower(), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        local = path
    elif path.exists() or spec.startswith((".", "/", "~")) or hub_id.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model '{spec}': expected a built-in model ({', '.join(builtin_models())}), an alias "
            f"({', '.join(sorted(aliases()))}), a hub id (org/name) or a local HF-format directory"
        )
    else:
        local = _snapshot(hub_id)
    return _load_local(local, source=hub_id if not path.is_dir() else str(path.resolve()))


def _snapshot(hub_id: str) -> Path:
    """The local snapshot of a hub repo: from the cache, else a download unless offline."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
    try:
        return Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")
    if not offline:
        try:
            size = download_size(hub_id)
            print(f"tops-edge: downloading {hub_id}{f' ({size})' if size else ''} into the Hugging Face cache",
                  file=sys.stderr, flush=True)
            return Path(snapshot_download(hub_id, allow_patterns=patterns))
        except Exception:
            pass
    size = download_size(hub_id)
    raise ModelNotFoundError(
        f"model '{hub_id}' is not in the Hugging Face cache and could not be downloaded; on a machine with "
        f"network run `hf download {hub_id}`{f' ({size})' if size else ''}, or pass a local directory with "
        f"its config, weights and processor"
    )


def download_size(hub_id: str) -> str | None:
    """'about 14.1 GB (7.06B parameters in fp16)' for a checkpoint an adapter knows; else None."""
    for adapter in ADAPTERS:
        params = adapter.hub_params_b.get(hub_id)
        if params is not None:
            return f"about {params * 2:.1f} GB: {params:.2f}B parameters in fp16"
    return None


def _load_local(path: Path, source: str) -> ModelAdapter:
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. the torchvision -> PIL image-processor fallback notice
    hf_logging.disable_progress_bar()  # "Loading weights": tops-export shows its own progress
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise UnsupportedModelError(f"cannot read the config in {path}: {str(exc).splitlines()[0]}") from None
    adapter_cls = adapter_for_model_type(config.model_type)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelNotFoundError(f"{path} has a config but no weights (*.safetensors); download the full model")
    try:
        model = adapter_cls.hf_model_class().from_pretrained(str(path), dtype=torch.float32)
        processor = adapter_cls.load_processor(path)
    except Exception as exc:
        raise ModelNotFoundError(f"cannot load the model in {path}: {str(exc).splitlines()[0]}") from None
    return adapter_cls(model, processor, source=source)


__all__ = ["ADAPTERS", "ModelAdapter", "PartSpec", "TensorSpec", "load", "builtin_models", "aliases", "CHECKPOINTS", "checkpoint_dir"]
