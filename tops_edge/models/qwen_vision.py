"""Qwen2.5-VL's vision tower as one ONNX-exportable graph, dynamic in the number of patches.

transformers' `Qwen2_5_VisionTransformerPretrainedModel.forward` derives its rotary ids, window
permutation and attention segments from `grid_thw` in Python (`.tolist()`, loops, `torch.split` by
`cu_seqlens`): a trace of it is valid for the traced grid only. The split here:

- the index arithmetic runs in numpy at run time, per image, from its grid alone
  (tops_edge.runtime.mrope.vision_index_arrays: `patch_positions`, `window_index`, `window_ids`);
- the graph takes those arrays as inputs next to `pixel_values` and holds only tensor ops whose
  shapes follow P (patches) and N = P / merge^2 (merged tokens): one export serves every grid.

HF's per-window attention (one attention call per `cu_seqlens` segment) becomes one masked attention
per block over all P patches: windowed blocks add a [P, P] mask, 0 where the two patches' merged
tokens share a window id and the dtype's minimum elsewhere (built once, shared by all windowed
blocks); full-attention blocks attend over the whole image unmasked (one image per graph call). The
masked softmax gives exactly zero weight outside the window, so the result is HF's up to float
summation order. The cost: the mask and each block's scores are P x P per head, against HF's
sum of window^2. At edge image sizes that is fine (448x448 px: P = 1024, a 4 MiB mask; 1024x1024 px:
P ~ 5.3k, ~110 MiB), and full-attention blocks pay P x P in HF too; for much larger images a
segmented kernel would be the better tool.

Outputs, all in HF's token order (HF's `reverse_indices = argsort(window_index)` undone by a scatter
of arange, which exports as ScatterElements):

- `image_features` [1, N, E]: HF's `get_image_features(...).pooler_output` (the merger's output);
- `vision_features` [1, N, 4 * Dv]: the merger's input, `ln_q(h).view(-1, 4 * Dv)` (each merged
  token's four patches, after the merger's RMSNorm, concatenated): what similarity-based token
  selectors measure;
- with `patch_attention`, `cls_attention` [1, N]: Qwen's ViT has no [CLS] token, so this is the
  documented substitute: in the LAST block, the softmax attention each key patch receives,
  averaged over heads and over all query patches, summed over the 4 patches of each merged token
  (sums to 1 over the N tokens). Computed from that block's own rotary q/k and mask, inside the
  block's attention, without changing its output.
"""

from __future__ import annotations

import torch
from torch import nn


def _apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    return apply_rotary_pos_emb_vision(q, k, cos, sin)


class QwenVision(nn.Module):
    """The tower of a Qwen2.5-VL model (`model.model.visual`), reusing its modules; see the module
    docstring. forward(pixel_values [P, D] float32, patch_positions [P, 2], window_index [N],
    window_ids [N] int64) -> (image_features [1, N, E], vision_features [1, N, 4*Dv]
    [, cls_attention [1, N] when built with patch_attention])."""

    def __init__(self, visual: nn.Module, patch_attention: bool = False):
        super().__init__()
        self.visual = visual
        self.patch_attention = patch_attention
        self.merge = int(visual.spatial_merge_size)
        self.unit = self.merge * self.merge
        self.full_blocks = frozenset(int(i) for i in visual.fullatt_block_indexes)

    # --- the graph -------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, patch_positions: torch.Tensor, window_index: torch.Tensor,
                window_ids: torch.Tensor):
        visual = self.visual
        h = visual.patch_embed(pixel_values.to(visual.patch_embed.proj.weight.dtype))  # [P, Dv]
        h = self._permute(h, window_index)
        cos, sin = visual.rotary_pos_emb(h, patch_positions)
        cos, sin = self._permute(cos, window_index), self._permute(sin, window_index)

        # [P, P] additive window mask from the tokens' window ids spread over their patches
        patch_window = window_ids.unsqueeze(1).expand(-1, self.unit).reshape(-1)
        same = patch_window.unsqueeze(1) == patch_window.unsqueeze(0)
        zero = torch.zeros((), dtype=h.dtype)
        window_mask = torch.where(same, zero, torch.tensor(torch.finfo(h.dtype).min, dtype=h.dtype))

        last = len(visual.blocks) - 1
        received = None
        for i, blk in enumerate(visual.blocks):
            mask = None if i in self.full_blocks else window_mask
            attended, probs = self._attention(blk.attn, blk.norm1(h), cos, sin, mask,
                                              want_probs=self.patch_attention and i == last)
            h = h + attended
            h = h + blk.mlp(blk.norm2(h))
            if probs is not None:  # [heads, P, P] -> what each key patch receives, mean over heads, queries
                received = probs.mean(dim=(0, 1)).reshape(-1, self.unit).sum(-1)  # [N], window order

        merger = visual.merger
        features = merger.ln_q(h).reshape(-1, self.unit * h.shape[-1])  # [N, 4*Dv], window order
        image = merger.mlp(features)
        reverse = self._inverse(window_index)
        outputs = (image[reverse].unsqueeze(0), features[reverse].unsqueeze(0))
        if self.patch_attention:
            outputs = (*outputs, received[reverse].unsqueeze(0))
        return outputs

    def _permute(self, x: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """HF's permute_input_for_window_attn: rows regrouped merge^2 at a time by window_index."""
        return x.reshape(-1, self.unit, x.shape[-1])[window_index].reshape(-1, x.shape[-1])

    @staticmethod
    def _inverse(window_index: torch.Tensor) -> torch.Tensor:
        """argsort of a permutation, as a scatter of arange (ScatterElements in ONNX)."""
        positions = torch.arange(window_index.shape[0], dtype=window_index.dtype)
        return torch.zeros_like(window_index).scatter(0, window_index, positions)

    @staticmethod
    def _attention(attn: nn.Module, x: torch.Tensor, cos, sin, mask, want_probs: bool):
        """HF's Qwen2_5_VLVisionAttention over all P patches at once, `mask` additive [P, P] or None.
        Returns (output [P, Dv], the softmax probabilities [heads, P, P] when want_probs else None)."""
        qkv = attn.qkv(x).reshape(-1, 3, attn.num_heads, attn.head_dim).permute(1, 0, 2, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [P, heads, hd]
        q, k = _apply_rotary(q, k, cos, sin)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, P, hd]
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(x.shape[0], -1)
        return attn.proj(out), (probs if want_probs else None)

    # --- export helpers ----------------------------------------------------------------------------
    def index_arrays(self, grid_h: int, grid_w: int) -> dict:
        """vision_index_arrays for this tower's config (numpy int64)."""
        from ..runtime.mrope import vision_index_arrays

        cfg = self.visual.config
        return vision_index_arrays(grid_h, grid_w, self.merge, cfg.window_size, cfg.patch_size)

    def example_inputs(self, grid_h: int = 8, grid_w: int = 12) -> tuple[torch.Tensor, ...]:
        """(pixel_values [P, D] random, patch_positions, window_index, window_ids) for a grid_h x
        grid_w patch grid: the trace inputs of an export."""
        embed = self.visual.patch_embed
        dim = embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2
        arrays = self.index_arrays(grid_h, grid_w)
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(grid_h * grid_w, dim, generator=generator)
        return (pixels, *(torch.from_numpy(arrays[k]) for k in ("patch_positions", "window_index", "window_ids")))
