"""A model's architecture without its weights: what the memory planner needs for a dry run.

`load_architecture(MODEL)` builds the HF model on the meta device (no memory, no weights) from:
  - a built-in model: the real one (built in code, or a few MB of package data);
  - a known hub id or alias: the config numbers below, copied from the llava-hf `config.json`
    files (the fields the parts depend on), so `--dry-run` works on a machine without the model;
  - a local HF directory, or a hub id in the Hugging Face cache: its `config.json`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError

_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)


def _llava15(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return dict(
        vision=_CLIP_L_336,
        text=dict(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
        llava=dict(image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                   projector_hidden_act="gelu"),
    )


#: hub id -> config fields (llava-hf/llava-1.5-{7b,13b}-hf: Vicuna-1.5 = Llama-2 shapes, CLIP ViT-L/14-336)
KNOWN_CONFIGS = {
    "llava-hf/llava-1.5-7b-hf": _llava15(4096, 11008, 32, 32),
    "llava-hf/llava-1.5-13b-hf": _llava15(5120, 13824, 40, 40),
}


def known_config(hub_id: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    spec = KNOWN_CONFIGS[hub_id]
    return LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=LlamaConfig(**spec["text"]),
                       **spec["llava"])


def _cached_config(hub_id: str):
    from huggingface_hub import hf_hub_download
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(Path(hf_hub_download(hub_id, "config.json", local_files_only=True)).parent))
    except Exception:
        raise ModelNotFoundError(
            f"no config for '{hub_id}' on this machine: run `hf download {hub_id} config.json`, or pass a local directory"
        ) from None


def load_architecture(spec: str):
    """An adapter whose model lives on the meta device (or the tiny model itself)."""
    import torch
    from transformers import AutoConfig

    from . import adapter_for_model_type, aliases, builtin_models, load

    if spec in builtin_models():  # small enough to load for real
        return load(spec)
    hub_id = aliases().get(spec.lower(), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
        config, source = AutoConfig.from_pretrained(str(path)), str(path.resolve())
    elif hub_id in KNOWN_CONFIGS:
        config, source = known_config(hub_id), hub_id
    elif hub_id.count("/") == 1 and not spec.startswith((".", "/", "~")):
        config, source = _cached_config(hub_id), hub_id
    else:
        load(spec)  # raises the same "unknown model" error as an export would
        raise ModelNotFoundError(f"unknown model '{spec}'")
    adapter_cls = adapter_for_model_type(config.model_type)
    with torch.device("meta"):
        model = adapter_cls.hf_model_class()(config)
    return adapter_cls(model, None, source=source)
