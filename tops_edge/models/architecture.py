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


#: LLaVA-NeXT's anyres resolutions (llava-v1.6 config.json: image_grid_pinpoints), (height, width)
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava16(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None,
             text_type: str = "llama", context: int = 4096, rope_theta: float = 10000.0) -> dict:
    spec = _llava15(hidden, intermediate, layers, heads)
    spec["text"].update(num_key_value_heads=kv_heads or heads, max_position_embeddings=context, rope_theta=rope_theta)
    spec.update(family="llava_next", text_type=text_type,
                llava=dict(spec["llava"], image_grid_pinpoints=_NEXT_PINPOINTS, image_seq_length=576))
    return spec


#: Qwen2.5-VL's ViT (the same in 3B and 7B; only its merger's output width follows the LLM)
_QWEN25_VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                   tokens_per_second=2, hidden_act="silu")
#: the published preprocessor_config.json caps (Qwen/Qwen2.5-VL-*-Instruct): 4 .. 16384 tokens of 28x28 px
QWEN25_PIXELS = dict(min_pixels=3136, max_pixels=12845056)


def _qwen25(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool) -> dict:
    return dict(
        family="qwen2_5_vl",
        vision=dict(_QWEN25_VIT, out_hidden_size=hidden),
        text=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128000,
                  rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=tied,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                  bos_token_id=151643, eos_token_id=151645),
        top=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653, tie_word_embeddings=tied),
        pixels=QWEN25_PIXELS,
    )


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool, vit: dict) -> dict:
    return dict(
        family="qwen3_vl",
        vision=dict(vit, out_hidden_size=hidden, in_channels=3, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh"),
        text=dict(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128,
                  max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=tied,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True},
                  bos_token_id=151643, eos_token_id=151645),
        top=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653, tie_word_embeddings=tied),
        pixels=dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16384),
    )


_QWEN3_VIT_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=[5, 11, 17])
_QWEN3_VIT_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16, 24])

#: hub id -> config fields (llava-hf/llava-1.5-{7b,13b}-hf and llava-v1.6-{vicuna-7b,vicuna-13b,mistral-7b}-hf:
#: Vicuna-1.5 = Llama-2 shapes or Mistral-7B, CLIP ViT-L/14-336;
#: Qwen/Qwen2.5-VL-{3B,7B}-Instruct from their config.json files; Qwen/Qwen3-VL-{2B,4B,8B}-Instruct from
#: copies of theirs found in other repositories (the hub files were not at hand: check them against a
#: download when the plan decides a purchase; a cached or local config.json is read instead when present))
KNOWN_CONFIGS = {
    "llava-hf/llava-1.5-7b-hf": _llava15(4096, 11008, 32, 32),
    "llava-hf/llava-1.5-13b-hf": _llava15(5120, 13824, 40, 40),
    "llava-hf/llava-v1.6-vicuna-7b-hf": _llava16(4096, 11008, 32, 32),
    "llava-hf/llava-v1.6-vicuna-13b-hf": _llava16(5120, 13824, 40, 40),
    "llava-hf/llava-v1.6-mistral-7b-hf": _llava16(4096, 14336, 32, 32, kv_heads=8, text_type="mistral", context=32768,
                                                  rope_theta=1000000.0),
    "Qwen/Qwen2.5-VL-3B-Instruct": _qwen25(2048, 11008, 36, 16, 2, 151936, tied=True),
    "Qwen/Qwen2.5-VL-7B-Instruct": _qwen25(3584, 18944, 28, 28, 4, 152064, tied=False),
    "Qwen/Qwen3-VL-2B-Instruct": _qwen3(2048, 6144, 28, 16, 8, tied=True, vit=_QWEN3_VIT_SMALL),
    "Qwen/Qwen3-VL-4B-Instruct": _qwen3(2560, 9728, 36, 32, 8, tied=True, vit=_QWEN3_VIT_SMALL),
    "Qwen/Qwen3-VL-8B-Instruct": _qwen3(4096, 12288, 36, 32, 8, tied=False, vit=_QWEN3_VIT_8B),
}


def known_config(hub_id: str):
    spec = KNOWN_CONFIGS[hub_id]
    if spec.get("family") == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(vision_config=spec["vision"], text_config=spec["text"], **spec["top"])
    if spec.get("family") == "qwen3_vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(vision_config=spec["vision"], text_config=spec["text"], **spec["top"])
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, MistralConfig

    text = (MistralConfig if spec.get("text_type") == "mistral" else LlamaConfig)(**spec["text"])
    config_class = LlavaNextConfig if spec.get("family") == "llava_next" else LlavaConfig
    return config_class(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=text, **spec["llava"])


class _CapsOnly:
    """Stands in for a processor in a config-only adapter: the image caps the planner needs."""

    def __init__(self, min_pixels: int, max_pixels: int):
        from types import SimpleNamespace

        self.image_processor = SimpleNamespace(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


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
    processor = None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
        config, source = AutoConfig.from_pretrained(str(path)), str(path.resolve())
    elif hub_id in KNOWN_CONFIGS:
        config, source = known_config(hub_id), hub_id
        processor = _CapsOnly(**KNOWN_CONFIGS[hub_id]["pixels"]) if "pixels" in KNOWN_CONFIGS[hub_id] else None
    elif hub_id.count("/") == 1 and not spec.startswith((".", "/", "~")):
        config, source = _cached_config(hub_id), hub_id
    else:
        load(spec)  # raises the same "unknown model" error as an export would
        raise ModelNotFoundError(f"unknown model '{spec}'")
    adapter_cls = adapter_for_model_type(config.model_type)
    with torch.device("meta"):
        model = adapter_cls.hf_model_class()(config)
    return adapter_cls(model, processor, source=source)
