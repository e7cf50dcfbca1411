"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP ViT -> 2-layer MLP projector -> Llama.

The split: vision = tower + feature-layer selection + projector; embed = the Llama's token embedding;
decoder = the Llama on inputs_embeds with a KV cache. Image features replace the single `<image>`
slot of the chat prompt (HF expands it to N tokens; we splice the selected K instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ModelAdapter, PartSpec, TensorSpec


class LlavaVision(nn.Module):
    """pixel_values -> (projected image features, vision features before the projector[, CLS attention]).

    Mirrors `LlavaModel.get_image_features` (vision_feature_layer, vision_feature_select_strategy) but
    returns stacked tensors, and also the pre-projector features that selectors may measure
    similarity on. With `cls_attention`, it adds the [CLS] token's attention to every token of the
    sequence (mean over heads) in the layer that produces the selected features (VisionZip's
    "penultimate layer" for LLaVA's default -2). It is computed here from that layer's input and its
    q/k projections, so the tower keeps its fast attention kernel.
    """

    def __init__(self, llava_model: nn.Module, feature_layer: int | list[int], strategy: str, cls_attention: bool = False):
        super().__init__()
        self.vision_tower = llava_model.vision_tower
        self.projector = llava_model.multi_modal_projector
        self.layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        self.strategy = strategy
        self.cls_attention = cls_attention

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """HF's `hidden_states` (embeddings, then each layer's output), computed only as deep as the
        selected feature layers reach: LLaVA's default -2 never needs the tower's last layer."""
        tower = self.vision_tower
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if layers is None or not hasattr(tower, "pre_layrnorm"):  # not a CLIP-shaped tower
            return list(tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states)
        depth = max(i % (len(layers) + 1) for i in self.layers)
        h = tower.pre_layrnorm(tower.embeddings(pixel_values))
        states = [h]
        for layer in layers[:depth]:
            h = layer(h, None)
            states.append(h)
        return states + [None] * (len(layers) - depth)  # keep negative indices meaning what they mean in HF

    def forward(self, pixel_values: torch.Tensor):
        states = self.hidden_states(pixel_values)
        feats = [states[i] for i in self.layers]
        if self.strategy == "default":  # drop the [CLS] token
            feats = [f[:, 1:] for f in feats]
        vision_features = torch.cat(feats, dim=-1)
        outputs = (self.projector(vision_features), vision_features)
        if self.cls_attention:
            outputs += (self._cls_attention(states),)
        return outputs

    def _cls_attention(self, hidden_states) -> torch.Tensor:
        layers = self.vision_tower.encoder.layers
        # hidden_states[i] is the output of layers[i - 1]; feature layer 0 (the embeddings) uses layer 0
        index = max(self.layers[-1] % (len(layers) + 1) - 1, 0)
        layer = layers[index]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden_states[index])
        b, n, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # [B, heads, 1, N]
        scores = probs.mean(1)[:, 0]
        return scores[:, 1:] if self.strategy == "default" else scores


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)
    aliases = {
        "llava-v1.5-7b": "llava-hf/llava-1.5-7b-hf",
        "llava-v1.5-13b": "llava-hf/llava-1.5-13b-hf",
        "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
        "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    }
    #: billions of parameters of the published checkpoints (stored in fp16): what a download costs
    hub_params_b = {"llava-hf/llava-1.5-7b-hf": 7.06, "llava-hf/llava-1.5-13b-hf": 13.35}
    tiny_names = ("tiny-llava", "tiny-llava-medium")
    #: the vision graph's batch dimension: images here, crops of one image for anyres
    crops_dim = "num_images"

    @classmethod
    def hf_model_class(cls):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def build_tiny(cls, name: str, seed: int = 0) -> "LlavaAdapter":
        from .tiny import TINY_SIZES, build_tiny_llava

        model, processor = build_tiny_llava(seed=seed, **TINY_SIZES[name])
        return cls(model, processor, source=name)

    # --- layout ----------------------------------------------------------------------------
    @property
    def vision_config(self):
        return self.config.vision_config

    def visual_layout(self) -> dict[str, Any]:
        """The manifest's `visual` section: the `single` layout (runtime/layout.py)."""
        vc = self.vision_config
        side = vc.image_size // vc.patch_size
        n = side * side
        if self.config.vision_feature_select_strategy == "full":
            n += 1  # the [CLS] token stays in the sequence
        return {
            "layout": "single",
            "tokens_per_crop": n,
            "max_tokens": n,
            "max_selectable": n,
            "grid": [side, side],
            "image_size": [vc.image_size, vc.image_size],
            "image_token_id": int(self.config.image_token_id),
            "image_token": getattr(self.processor, "image_token", "<image>"),
            "has_cls_token": self.config.vision_feature_select_strategy == "full",
        }

    def parts(self, cls_attention: bool = False, cuts=(), probes=()) -> list[PartSpec]:
        """vision, embed, the decoder (its segments with `cuts`; `probes`: see decoder_parts).
        `cls_attention` adds that output to the vision part (attention selector)."""
        cfg = self.config
        vc = self.vision_config
        n = self.visual_layout()["tokens_per_crop"]
        vision_width = vc.hidden_size * (1 if isinstance(cfg.vision_feature_layer, int) else len(cfg.vision_feature_layer))
        outputs = [
            TensorSpec("image_features", "float32", (self.crops_dim, n, self.hidden_size)),
            TensorSpec("vision_features", "float32", (self.crops_dim, n, vision_width)),
        ]
        if cls_attention:
            outputs.append(TensorSpec("cls_attention", "float32", (self.crops_dim, n)))
        vision = PartSpec(
            name="vision",
            module=LlavaVision(self.model.model, cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cls_attention),
            inputs=[TensorSpec("pixel_values", "float32", (self.crops_dim, vc.num_channels, vc.image_size, vc.image_size))],
            outputs=outputs,
            example_inputs=lambda: (torch.randn(1, vc.num_channels, vc.image_size, vc.image_size),),
        )
        lm = self.model.model.language_model
        return [vision, self.embed_part(lm.get_input_embeddings()), *self.decoder_parts(lm, self.model.lm_head, cuts, probes)]
