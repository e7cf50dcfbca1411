"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): a ViT with 16 px patches, a learned position table
resampled to each image's grid and full attention in every block -> a Qwen3 LLM (q/k norms,
interleaved M-RoPE) whose first layers also receive DeepStack features.

The split is Qwen2.5-VL's (models/qwen2_5_vl.py): vision (models/qwen3_vision.py, dynamic in the
patch count; its resampling indices and weights are numpy at run time, runtime/mrope3.py), embed,
and the decoder in segments with M-RoPE's three position rows. DeepStack: HF adds the merged
features of L_ds intermediate ViT blocks to the hidden states at the image positions after decoder
layers 0 .. L_ds-1. The vision graph outputs them (`deepstack_features` [L_ds, N, E]); every decoder
segment that holds some of those layers takes `deepstack_embeds` [n, B, S, E] (n of its layers
receive one): the rows its sequence's kept visual tokens would get, zeros on text rows and on decode
steps. So after pruning, before the LLM or at a cut, the injections follow the kept tokens: a dropped
token's DeepStack rows go with it (HF adds them by a mask over image positions; here the mask is the
kept rows').
"""

from __future__ import annotations

import torch

from .base import DecoderSegment, PartSpec, TensorSpec
from .qwen2_5_vl import Qwen2_5_VLAdapter


class DeepstackSegment(DecoderSegment):
    """A DecoderSegment whose layers first .. first+n-1 (n = how many of 0 .. L_ds-1 it holds) each
    add their row of `deepstack_embeds` [n, B, S, E] to the hidden states after the layer, as
    Qwen3-VL's text model does (its `_deepstack_process`, by the rows here instead of a mask)."""

    def __init__(self, language_model, lm_head, first: int, last: int, probe: bool, deepstack_layers: int):
        super().__init__(language_model, lm_head, first, last, probe)
        self.injected = max(0, min(last, deepstack_layers) - first)  # n

    def forward(self, hidden_states, attention_mask, position_ids, attention_bias, cache_position, *rest):
        if not self.injected:
            return super().forward(hidden_states, attention_mask, position_ids, attention_bias, cache_position, *rest)
        self._rows = rest[0]
        try:
            return super().forward(hidden_states, attention_mask, position_ids, attention_bias, cache_position, *rest[1:])
        finally:
            self._rows = None

    def after_layer(self, index: int, h: torch.Tensor) -> torch.Tensor:
        i = index - self.first
        return h + self._rows[i] if self.injected and i < self.injected else h


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    aliases = {
        "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
        "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
        "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    }
    #: the built-in configs' parameter counts (models/architecture.py), which are the published sizes
    hub_params_b = {"Qwen/Qwen3-VL-2B-Instruct": 2.13, "Qwen/Qwen3-VL-4B-Instruct": 4.44, "Qwen/Qwen3-VL-8B-Instruct": 8.77}
    tiny_names = ("tiny-qwen3-vl",)

    @classmethod
    def hf_model_class(cls):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    @classmethod
    def build_tiny(cls, name: str, seed: int = 0) -> "Qwen3VLAdapter":
        from .tiny_qwen3 import TINY_QWEN3_SIZES, build_tiny_qwen3

        model, processor = build_tiny_qwen3(seed=seed, **TINY_QWEN3_SIZES[name])
        return cls(model, processor, source=name)

    @property
    def deepstack_layers(self) -> int:
        return len(self.vision_config.deepstack_visual_indexes or ())

    def visual_layout(self):
        layout = super().visual_layout()
        layout.update(vision_index="qwen3", num_position_embeddings=int(self.vision_config.num_position_embeddings),
                      deepstack_layers=self.deepstack_layers)
        layout.pop("window_size", None)
        return layout

    def pixel_caps(self) -> tuple[int, int]:
        ip = getattr(self.processor, "image_processor", None)
        if ip is None:  # a config-only adapter without caps: Qwen3-VL's published ones (16 .. 16384 tokens of 32 px)
            return 32 * 32 * 4, 32 * 32 * 16384
        return super().pixel_caps()

    def vision_module(self, cls_attention: bool):
        """Qwen3-VL's tower (models/qwen3_vision.py): the position table's resampling indices and
        weights as inputs (runtime/mrope3.py), and its DeepStack features as an output."""
        from .qwen3_vision import Qwen3Vision

        inputs = [TensorSpec("patch_positions", "int64", ("num_patches", 2)),
                  TensorSpec("interp_indices", "int64", ("num_patches", 4)),
                  TensorSpec("interp_weights", "float32", ("num_patches", 4))]
        outputs = [TensorSpec("deepstack_features", "float32", (self.deepstack_layers, "num_tokens", self.hidden_size))]
        return Qwen3Vision(self.model.model.visual, patch_attention=cls_attention), inputs, outputs

    def decoder_parts(self, language_model, lm_head, cuts=(), probes=()) -> list[PartSpec]:
        cuts = self.check_cuts(cuts)
        bounds = [0, *cuts, self.num_layers]
        parts = []
        for index, (first, last) in enumerate(zip(bounds, bounds[1:])):
            name = "decoder" if len(bounds) == 2 else f"decoder.{index}"
            segment = DeepstackSegment(language_model, lm_head, first, last, last in probes, self.deepstack_layers)
            parts.append(self._segment_part(name, segment))
        return parts

    def _segment_part(self, name: str, segment) -> PartSpec:
        part = super()._segment_part(name, segment)
        n = getattr(segment, "injected", 0)
        if not n:
            return part
        spec = TensorSpec("deepstack_embeds", "float32", (n, "batch", "sequence", self.hidden_size))
        at = [s.name for s in part.inputs].index("cache_position") + 1
        part.inputs.insert(at, spec)
        base = part.example_inputs

        def example():
            args = base()
            seq = args[0].shape[1]
            return (*args[:at], torch.randn(n, 1, seq, self.hidden_size), *args[at:])

        part.example_inputs = example
        return part
