"""Qwen3-VL's vision tower as one ONNX-exportable graph, dynamic in the number of patches.

transformers' `Qwen3VLVisionModel.forward` derives three things from `grid_thw` with Python-side
ops (`.tolist()`, `repeat_interleave`, `torch.split` by `cu_seqlens`): the rotary ids, the bilinear
resampling of the learned position table to the image's grid, and the attention segments. A trace
of it is valid for the traced grid only. The split here, as for Qwen2.5-VL (models/qwen_vision.py):

- the index arithmetic runs in numpy at run time, per image, from its grid alone
  (tops_edge.runtime.mrope3.vision_index_arrays_qwen3: `patch_positions`, `interp_indices`,
  `interp_weights`);
- the graph takes those arrays as inputs next to `pixel_values` and holds only tensor ops whose
  shapes follow P (patches) and N = P / merge^2 (merged tokens): one export serves every grid.

Qwen3-VL has no window attention: with one image per graph call, HF's `cu_seqlens` is the single
segment [0, P], so every block is one unmasked attention over all P patches (exactly HF's, up to
float summation order). The learned position embedding is HF's weighted gather: each patch adds
sum_k pos_embed[interp_indices[p, k]] * interp_weights[p, k] (its four bilinear corners on the
square table) to its patch embedding before the first block. Patches stay in the processor's
block-major order throughout (no window permutation), which is HF's output order.

Outputs:

- `image_features` [1, N, E]: HF's `get_image_features(...).pooler_output` (the merger's output);
- `vision_features` [1, N, 4 * Dv]: the merger's input after its norm, `merger.norm(h).view(-1,
  4 * Dv)` (each merged token's four patches, after the merger's LayerNorm, concatenated): what
  similarity-based token selectors measure (as qwen_vision.py's);
- `deepstack_features` [L_ds, N, E]: HF's `deepstack_features`, one row per entry of
  `deepstack_visual_indexes`, in that order: the output of block i through its own merger
  (`deepstack_merger_list[k]`, LayerNorm after the 2x2 shuffle). The LLM adds row k to the hidden
  states at the image positions after its decoder layer k;
- with `patch_attention`, `cls_attention` [1, N]: Qwen's ViT has no [CLS] token, so this is the
  documented substitute of qwen_vision.py: in the LAST block, the softmax attention each key patch
  receives, averaged over heads and over all query patches, summed over the 4 patches of each
  merged token (sums to 1 over the N tokens). Computed from that block's own rotary q/k inside its
  attention, without changing its output.
"""

from __future__ import annotations

import torch
from torch import nn


def _apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    return apply_rotary_pos_emb_vision(q, k, cos, sin)


class Qwen3Vision(nn.Module):
    """The tower of a Qwen3-VL model (`model.model.visual`), reusing its modules; see the module
    docstring. forward(pixel_values [P, D] float32, patch_positions [P, 2] int64, interp_indices
    [P, 4] int64, interp_weights [P, 4] float32) -> (image_features [1, N, E], vision_features
    [1, N, 4*Dv], deepstack_features [L_ds, N, E] [, cls_attention [1, N] when built with
    patch_attention])."""

    input_names = ("pixel_values", "patch_positions", "interp_indices", "interp_weights")

    def __init__(self, visual: nn.Module, patch_attention: bool = False):
        super().__init__()
        self.visual = visual
        self.patch_attention = patch_attention
        self.merge = int(visual.spatial_merge_size)
        self.unit = self.merge * self.merge
        self.deepstack = [int(i) for i in visual.deepstack_visual_indexes]

    # --- the graph -------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, patch_positions: torch.Tensor, interp_indices: torch.Tensor,
                interp_weights: torch.Tensor):
        visual = self.visual
        h = visual.patch_embed(pixel_values.to(visual.patch_embed.proj.weight.dtype))  # [P, Dv]
        pos = (visual.pos_embed(interp_indices) * interp_weights.to(h.dtype).unsqueeze(-1)).sum(1)
        h = h + pos.to(h.dtype)
        cos, sin = visual.rotary_pos_emb(h, patch_positions)

        last = len(visual.blocks) - 1
        received = None
        deepstack = []
        for i, blk in enumerate(visual.blocks):
            attended, probs = self._attention(blk.attn, blk.norm1(h), cos, sin,
                                              want_probs=self.patch_attention and i == last)
            h = h + attended
            h = h + blk.mlp(blk.norm2(h))
            if i in self.deepstack:
                deepstack.append(visual.deepstack_merger_list[self.deepstack.index(i)](h))
            if probs is not None:  # [heads, P, P] -> what each key patch receives, mean over heads, queries
                received = probs.mean(dim=(0, 1)).reshape(-1, self.unit).sum(-1)  # [N]

        merger = visual.merger
        features = merger.norm(h).reshape(-1, self.unit * h.shape[-1])  # [N, 4*Dv]
        image = merger.linear_fc2(merger.act_fn(merger.linear_fc1(features)))
        if deepstack:
            stacked = torch.stack(deepstack, dim=0)
        else:  # a tower without DeepStack taps (none in Qwen3-VL): an empty [0, N, E]
            stacked = image.new_zeros((0, image.shape[0], image.shape[1]))
        outputs = (image.unsqueeze(0), features.unsqueeze(0), stacked)
        if self.patch_attention:
            outputs = (*outputs, received.unsqueeze(0))
        return outputs

    @staticmethod
    def _attention(attn: nn.Module, x: torch.Tensor, cos, sin, want_probs: bool):
        """HF's Qwen3VLVisionAttention over all P patches (one image: one segment). Returns
        (output [P, Dv], the softmax probabilities [heads, P, P] when want_probs else None)."""
        qkv = attn.qkv(x).reshape(-1, 3, attn.num_heads, attn.head_dim).permute(1, 0, 2, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [P, heads, hd]
        q, k = _apply_rotary(q, k, cos, sin)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, P, hd]
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(x.shape[0], -1)
        return attn.proj(out), (probs if want_probs else None)

    # --- export helpers ----------------------------------------------------------------------------
    def index_arrays(self, grid_h: int, grid_w: int) -> dict:
        """vision_index_arrays_qwen3 for this tower's config (int64 indices, float32 weights)."""
        from ..runtime.mrope3 import vision_index_arrays_qwen3

        return vision_index_arrays_qwen3(grid_h, grid_w, self.merge, self.visual.config.num_position_embeddings)

    def inputs_for(self, pixel_values: torch.Tensor, grid_h: int, grid_w: int) -> tuple[torch.Tensor, ...]:
        """The forward's arguments for one image's pixel_values and its patch grid."""
        arrays = self.index_arrays(grid_h, grid_w)
        return (pixel_values, *(torch.from_numpy(arrays[k]) for k in self.input_names[1:]))

    def example_inputs(self, grid_h: int = 8, grid_w: int = 12) -> tuple[torch.Tensor, ...]:
        """(pixel_values [P, D] random, patch_positions, interp_indices, interp_weights) for a
        grid_h x grid_w patch grid: the trace inputs of an export."""
        embed = self.visual.patch_embed
        dim = embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2
        generator = torch.Generator().manual_seed(0)
        return self.inputs_for(torch.randn(grid_h * grid_w, dim, generator=generator), grid_h, grid_w)
