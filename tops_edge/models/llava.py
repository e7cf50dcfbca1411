"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP ViT -> 2-layer MLP projector -> Llama.

The split: vision = tower + feature-layer selection + projector; embed = the Llama's token embedding;
decoder = the Llama on inputs_embeds with a KV cache. Image features replace the single `<image>`
slot of the chat prompt (HF expands it to N tokens; we splice the selected K instead).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import ModelAdapter, PartSpec, TensorSpec


class LlavaVision(nn.Module):
    """pixel_values -> projected image features, honouring vision_feature_layer / select_strategy.

    Mirrors `LlavaModel.get_image_features` but returns one stacked tensor (HF returns a list).
    """

    def __init__(self, llava_model: nn.Module, feature_layer: int | list[int], strategy: str):
        super().__init__()
        self.vision_tower = llava_model.vision_tower
        self.projector = llava_model.multi_modal_projector
        self.feature_layer = feature_layer
        self.strategy = strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        feats = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":  # drop the [CLS] token
            feats = [f[:, 1:] for f in feats]
        return self.projector(torch.cat(feats, dim=-1))


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)
    aliases = {
        "llava-v1.5-7b": "llava-hf/llava-1.5-7b-hf",
        "llava-v1.5-13b": "llava-hf/llava-1.5-13b-hf",
        "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
        "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    }
    tiny_names = ("tiny-llava",)

    @classmethod
    def hf_model_class(cls):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def build_tiny(cls, name: str, seed: int = 0) -> "LlavaAdapter":
        from .tiny import build_tiny_llava

        model, processor = build_tiny_llava(seed=seed)
        return cls(model, processor, source=name)

    # --- layout ----------------------------------------------------------------------------
    @property
    def vision_config(self):
        return self.config.vision_config

    def visual_layout(self) -> dict[str, Any]:
        vc = self.vision_config
        side = vc.image_size // vc.patch_size
        n = side * side
        if self.config.vision_feature_select_strategy == "full":
            n += 1  # the [CLS] token stays in the sequence
        return {
            "tokens_per_image": n,
            "grid": [side, side],
            "image_size": [vc.image_size, vc.image_size],
            "image_token_id": int(self.config.image_token_id),
            "image_token": getattr(self.processor, "image_token", "<image>"),
            "has_cls_token": self.config.vision_feature_select_strategy == "full",
        }

    def parts(self) -> list[PartSpec]:
        cfg = self.config
        vc = self.vision_config
        layout = self.visual_layout()
        n = layout["tokens_per_image"]
        vision = PartSpec(
            name="vision",
            module=LlavaVision(self.model.model, cfg.vision_feature_layer, cfg.vision_feature_select_strategy),
            inputs=[TensorSpec("pixel_values", "float32", ("num_images", vc.num_channels, vc.image_size, vc.image_size))],
            outputs=[TensorSpec("image_features", "float32", ("num_images", n, self.hidden_size))],
            example_inputs=lambda: (torch.randn(1, vc.num_channels, vc.image_size, vc.image_size),),
        )
        lm = self.model.model.language_model
        return [vision, self.embed_part(lm.get_input_embeddings()), self.decoder_part(lm, self.model.lm_head)]

    @staticmethod
    def grid_side(tokens: int) -> int:
        side = math.isqrt(tokens)
        return side if side * side == tokens else 0
