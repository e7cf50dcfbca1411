"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, "anyres"): LLaVA-1.5's parts, many crops per image.

The vision graph is LLaVA-1.5's (tower + feature layer + projector), run on a variable number of
336px crops of one image: the base view plus the crops of the best pinpoint grid. Stitching the
crops, unpadding and the `image_newline` tokens are index arithmetic that the runtime does from the
manifest (`visual.layout = "anyres"`, see runtime/layout.py); the learned newline vector is saved
beside the graphs as `image_newline.npy`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UnsupportedModelError
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    aliases = {
        "llava-v1.6-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-v1.6-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-v1.6-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
        "llava-v1.6-vicuna-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
        "llava-v1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    }
    hub_params_b = {"llava-hf/llava-v1.6-vicuna-7b-hf": 7.06, "llava-hf/llava-v1.6-vicuna-13b-hf": 13.35,
                    "llava-hf/llava-v1.6-mistral-7b-hf": 7.57}
    tiny_names = ("tiny-llava-next",)
    crops_dim = "num_crops"

    def __init__(self, model, processor, source: str):
        super().__init__(model, processor, source)
        cfg = self.config
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"LLaVA-NeXT with vision_feature_select_strategy='{cfg.vision_feature_select_strategy}' is not supported "
                f"(anyres stitches {side}x{side} patch grids; only 'default', which drops [CLS], gives one)"
            )

    @classmethod
    def hf_model_class(cls):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    @classmethod
    def build_tiny(cls, name: str, seed: int = 0) -> "LlavaNextAdapter":
        from .tiny import TINY_NEXT_SIZES, build_tiny_llava

        model, processor = build_tiny_llava(seed=seed, next_config=True, **TINY_NEXT_SIZES[name])
        return cls(model, processor, source=name)

    def visual_layout(self) -> dict[str, Any]:
        """The `anyres` layout: per-crop facts plus the pinpoint grids; `max_tokens` is the longest
        sequence any image can produce (the largest grid, nothing unpadded, one newline per row)."""
        layout = super().visual_layout()
        side = layout["grid"][0]
        crop = self.vision_config.image_size
        pinpoints = [[int(h), int(w)] for h, w in self.config.image_grid_pinpoints]
        n = layout["tokens_per_crop"]
        cells = [(h // crop) * (w // crop) for h, w in pinpoints]
        rows = [(h // crop) * side for h, w in pinpoints]
        max_selectable = n + max(c * n for c in cells)
        layout.update(
            layout="anyres",
            grid_pinpoints=pinpoints,
            max_crops=1 + max(cells),
            max_selectable=max_selectable,
            max_tokens=max(n + c * n + r for c, r in zip(cells, rows)),
        )
        return layout

    def layout_arrays(self) -> dict[str, np.ndarray]:
        return {"image_newline": self.model.model.image_newline.detach().float().cpu().numpy()}
