"""Model families and how a `--model` string becomes an adapter.

MODEL may be a built-in tiny model (no download), a short alias, a local HF-format directory, or a
hub id that is in the Hugging Face cache (or downloadable, when the machine is online).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelNotFoundError, UnsupportedModelError
from .base import ModelAdapter, PartSpec, TensorSpec
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter, LlavaNextAdapter)


def builtin_models() -> list[str]:
    return [name for a in ADAPTERS for name in a.tiny_names]


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
            return Path(snapshot_download(hub_id, allow_patterns=patterns))
        except Exception:
            pass
    raise ModelNotFoundError(
        f"model '{hub_id}' is not in the Hugging Face cache and could not be downloaded; on a machine with "
        f"network run `hf download {hub_id}` (or pass a local directory with its config, weights and processor)"
    )


def _load_local(path: Path, source: str) -> ModelAdapter:
    import torch
    from transformers import AutoConfig, AutoProcessor
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
        processor = AutoProcessor.from_pretrained(str(path))
    except Exception as exc:
        raise ModelNotFoundError(f"cannot load the model in {path}: {str(exc).splitlines()[0]}") from None
    return adapter_cls(model, processor, source=source)


__all__ = ["ADAPTERS", "ModelAdapter", "PartSpec", "TensorSpec", "load", "builtin_models", "aliases"]
