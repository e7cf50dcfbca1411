"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): a windowed ViT with 2D rotary and a 2x2 patch
merger -> a Qwen2 LLM with M-RoPE.

The split: vision = patch embedding, the blocks (window attention, full attention every few blocks)
and the merger, over a dynamic number of patches (models/qwen_vision.py; the index arrays its
windows and rotary need are numpy arithmetic the runtime does, runtime/mrope.py); embed = the LLM's
token embedding; decoder = the Qwen2 layers over the fixed-size KV cache, cut into segments like
every family's (models/base.py DecoderSegment), whose `position_ids` are M-RoPE's three rows
(temporal, height, width) [3, B, S].

Dynamic resolution: the image processor resizes each image to a multiple of 28 px within its
`min_pixels` / `max_pixels`, so the image's token grid (H/28 x W/28) follows its size; the manifest's
`visual.layout = "mrope"` carries the processor's caps and the runtime reads each image's grid from
the processor (runtime/layout.py MropeLayout). `--max-image-tokens N` lowers `max_pixels` to N merged
tokens (N * 28 * 28 pixels), as llama.cpp's and Edge-LLM's caps do.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import ModelAdapter, PartSpec, TensorSpec


class Qwen2_5_VLAdapter(ModelAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    aliases = {
        "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
        "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    }
    hub_params_b = {"Qwen/Qwen2.5-VL-3B-Instruct": 3.75, "Qwen/Qwen2.5-VL-7B-Instruct": 8.29}
    tiny_names = ("tiny-qwen2.5-vl",)
    #: M-RoPE: the decoder's position_ids are three rows (temporal, height, width)
    position_rows = 3

    @classmethod
    def hf_model_class(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @classmethod
    def load_processor(cls, path):
        from ..runtime.qwen_processor import load_qwen_processor

        return load_qwen_processor(path)

    @classmethod
    def build_tiny(cls, name: str, seed: int = 0) -> "Qwen2_5_VLAdapter":
        from .tiny_qwen import TINY_QWEN_SIZES, build_tiny_qwen

        model, processor = build_tiny_qwen(seed=seed, **TINY_QWEN_SIZES[name])
        return cls(model, processor, source=name)

    # --- facts the manifest records -------------------------------------------------------------
    @property
    def vision_config(self):
        return self.config.vision_config

    @property
    def unit(self) -> int:
        """Pixels per merged token along a side (patch 14 x merge 2 = 28)."""
        vc = self.vision_config
        return vc.patch_size * vc.spatial_merge_size

    def pixel_caps(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the image processor (the published defaults when there is none)."""
        from .architecture import QWEN25_PIXELS

        ip = getattr(self.processor, "image_processor", None)
        size = getattr(ip, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
        lo = get("shortest_edge", None) or getattr(ip, "min_pixels", None) or QWEN25_PIXELS["min_pixels"]
        hi = get("longest_edge", None) or getattr(ip, "max_pixels", None) or QWEN25_PIXELS["max_pixels"]
        return int(lo), int(hi)

    def cap_image_tokens(self, max_tokens: int) -> None:
        """`--max-image-tokens N`: the image processor's max_pixels becomes N merged tokens."""
        lo, hi = self.pixel_caps()
        least = -(-lo // (self.unit * self.unit))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < max(least, 1):
            raise InputError(f"--max-image-tokens must be a whole number >= {max(least, 1)} (this model's "
                             f"min_pixels {lo} is {least} tokens), got {max_tokens!r}")
        cap = min(hi, max_tokens * self.unit * self.unit)
        ip = self.processor.image_processor
        ip.size = {"shortest_edge": lo, "longest_edge": cap}
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = cap

    def visual_layout(self) -> dict[str, Any]:
        """The manifest's `visual` section: the `mrope` layout (runtime/layout.py MropeLayout)."""
        vc = self.vision_config
        lo, hi = self.pixel_caps()
        max_tokens = hi // (self.unit * self.unit)
        image_token = getattr(self.processor, "image_token", "<|image_pad|>")
        return {
            "layout": "mrope",
            "tokens_per_crop": max_tokens,
            "max_tokens": max_tokens,
            "max_selectable": max_tokens,
            "min_tokens": max(1, -(-lo // (self.unit * self.unit))),
            "max_patches": max_tokens * vc.spatial_merge_size ** 2,
            "grid": None,  # per image: the processor's resize decides it
            "patch_size": int(vc.patch_size),
            "merge_size": int(vc.spatial_merge_size),
            "temporal_patch_size": int(vc.temporal_patch_size),
            "window_size": int(getattr(vc, "window_size", 0)),
            "min_pixels": lo,
            "max_pixels": hi,
            "image_token_id": int(self.config.image_token_id),
            "image_token": image_token,
            "has_cls_token": False,
        }

    def check_positions(self, positions: str) -> None:
        if positions != "original":
            raise InputError("Qwen-VL's M-RoPE positions stay as HF computes them for the unpruned image "
                             "(--positions original): a kept token keeps its (t, h, w) ids, the text after the image "
                             "resumes where it would; 'compact' has no defined meaning on a 2D position grid")

    def parts(self, cls_attention: bool = False, cuts=(), probes=()) -> list[PartSpec]:
        """vision (dynamic patch count), embed, the decoder or its segments; `cls_attention` adds the
        vision part's substitute for a [CLS] attention (the attention each token receives in the last
        block: models/qwen_vision.py)."""
        vc = self.vision_config
        module, index_inputs, extra_outputs = self.vision_module(cls_attention)
        width = vc.hidden_size * vc.spatial_merge_size ** 2
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        outputs = [TensorSpec("image_features", "float32", (1, "num_tokens", self.hidden_size)),
                   TensorSpec("vision_features", "float32", (1, "num_tokens", width)), *extra_outputs]
        if cls_attention:
            outputs.append(TensorSpec("cls_attention", "float32", (1, "num_tokens")))
        vision = PartSpec(
            name="vision",
            module=module,
            inputs=[TensorSpec("pixel_values", "float32", ("num_patches", patch_dim)), *index_inputs],
            outputs=outputs,
            example_inputs=module.example_inputs,
        )
        lm = self.model.model.language_model
        return [vision, self.embed_part(lm.get_input_embeddings()),
                *self.decoder_parts(lm, self.model.lm_head, cuts, probes)]

    def vision_module(self, cls_attention: bool):
        """(the vision graph's module, its index inputs after pixel_values, its outputs beside the
        features): Qwen2.5-VL's windows (runtime/mrope.py)."""
        from .qwen_vision import QwenVision

        inputs = [TensorSpec("patch_positions", "int64", ("num_patches", 2)),
                  TensorSpec("window_index", "int64", ("num_tokens",)),
                  TensorSpec("window_ids", "int64", ("num_tokens",))]
        return QwenVision(self.model.model.visual, patch_attention=cls_attention), inputs, []

    def position_example(self, past_len: int, seq: int) -> torch.Tensor:
        return torch.arange(past_len, past_len + seq).view(1, 1, -1).expand(3, 1, seq).contiguous()
