"""Visual layouts: how one image's vision-graph outputs become its visual-token sequence.

The manifest's `visual.layout` names one, so the runtime needs no model adapter:

- `single` (LLaVA-1.5): one pass of the vision tower; its N tokens are the sequence.
- `mrope` (Qwen2.5-VL): dynamic resolution. The image processor resizes the image within its pixel
  caps; its H x W patches are merged 2x2 into (H/2) x (W/2) tokens, in row-major order, one segment.
  The vision graph takes the patches plus index arrays for its windows and 2D rotary
  (runtime/mrope.py), and the decoder M-RoPE's three position rows (`MropeLayout.positions`).
- `anyres` (LLaVA-NeXT): the image is cut into a base view plus a grid of crops (the grid is the
  pinpoint resolution that fits the image best). The sequence is the base view's tokens, then the
  crops' tokens stitched into one patch grid, the rows and columns that only cover padding removed
  ("unpadding"), with a learned `image_newline` token after each row. The same arithmetic as
  `LlavaNextModel.pack_image_features`, kept as index arrays so the runtime can gather any per-token
  tensor (projected features, vision features, [CLS] attention) with it.

Every layout splits its sequence into segments for pruning: `single` has one; `anyres` has the base
view and each crop, and its newline tokens belong to no segment (they are always kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

NEWLINE = -1  # `source` of a newline token (it has no vision-graph token)
#: how a budget K is split over an anyres image's segments (base view and crops)
BUDGETS = ("proportional", "global")
#: position ids after pruning: `compact` renumbers the kept tokens, `original` keeps theirs
POSITIONS = ("compact", "original")


@dataclass(frozen=True)
class TokenMap:
    """One image's visual-token sequence, as indices into the vision graph's outputs.

    source[t]  index into the flattened [num_crops * tokens_per_crop] outputs, or NEWLINE
    segment[t] the pruning segment of token t (0 = base view / the image, c = crop c), or -1 for a newline
    grids[s]   (rows, cols) of segment s's tokens, for spatial selectors (uniform)
    num_crops  how many crops the vision graph must see (pixel_values[:num_crops])
    """

    source: np.ndarray
    segment: np.ndarray
    grids: tuple[tuple[int, int], ...]
    num_crops: int

    def __len__(self) -> int:
        return len(self.source)

    @property
    def selectable(self) -> int:
        """Tokens a selector chooses among (all but the newline tokens)."""
        return int((self.segment >= 0).sum())

    @property
    def newlines(self) -> np.ndarray:
        return np.flatnonzero(self.segment < 0)

    def gather(self, per_crop: np.ndarray, newline: np.ndarray | None = None) -> np.ndarray:
        """[num_crops, n, ...] vision-graph output -> [T, ...] in sequence order; newline rows take
        `newline` (zeros when None: e.g. for vision features, which selectors never read there)."""
        flat = per_crop.reshape(-1, *per_crop.shape[2:])
        out = flat[np.where(self.source >= 0, self.source, 0)]
        if len(self.newlines):
            out = out.copy()
            out[self.newlines] = 0 if newline is None else newline
        return out


class SingleLayout:
    """LLaVA-1.5: the image is one crop; its tokens lie on `grid` (or 1 x N with [CLS])."""

    name = "single"

    def __init__(self, visual: dict):
        self.tokens_per_crop = int(visual["tokens_per_crop"])
        gh, gw = visual["grid"]
        self.grid = (int(gh), int(gw)) if gh * gw == self.tokens_per_crop else (1, self.tokens_per_crop)
        n = self.tokens_per_crop
        self._map = TokenMap(np.arange(n), np.zeros(n, dtype=np.int64), (self.grid,), 1)

    def token_map(self, image_size: tuple[int, int] | None = None) -> TokenMap:
        return self._map

    @property
    def max_tokens(self) -> int:
        return self.tokens_per_crop

    def vision_feeds(self, pixels: np.ndarray, image_size, token_map: TokenMap) -> dict[str, np.ndarray]:
        return {"pixel_values": pixels[: token_map.num_crops]}


class MropeLayout:
    """Qwen2.5-VL: one image, its token grid decided by the processor's resize (`image_size` here is
    the image's patch grid (H, W), as the processor's image_grid_thw says)."""

    name = "mrope"

    def __init__(self, visual: dict):
        self.merge = int(visual["merge_size"])
        self.patch_size = int(visual["patch_size"])
        #: which index arrays the vision graph takes: Qwen2.5-VL's windows, or Qwen3-VL's resampling
        self.vision_index = visual.get("vision_index", "qwen2.5")
        self.window_size = int(visual.get("window_size", 0))
        self.position_table = int(visual.get("num_position_embeddings", 0))
        #: decoder layers that receive DeepStack features (Qwen3-VL), 0 for none
        self.deepstack_layers = int(visual.get("deepstack_layers", 0))
        self.max_tokens = int(visual["max_tokens"])
        self.tokens_per_crop = self.max_tokens

    def grid(self, image_size) -> tuple[int, int]:
        """(rows, cols) of merged tokens of an image of (H, W) patches."""
        h, w = (int(v) for v in image_size)
        return h // self.merge, w // self.merge

    def token_map(self, image_size) -> TokenMap:
        rows, cols = self.grid(image_size)
        n = rows * cols
        if n > self.max_tokens:  # the processor's caps make this impossible; a hand-edited folder could
            raise InputError(f"the image has {n} visual tokens, above this export's cap of {self.max_tokens}")
        return TokenMap(np.arange(n), np.zeros(n, dtype=np.int64), ((rows, cols),), 1)

    def vision_feeds(self, pixels: np.ndarray, image_size, token_map: TokenMap) -> dict[str, np.ndarray]:
        h, w = (int(v) for v in image_size)
        if self.vision_index == "qwen3":
            from .mrope3 import vision_index_arrays_qwen3

            return {"pixel_values": pixels, **vision_index_arrays_qwen3(h, w, self.merge, self.position_table)}
        from .mrope import vision_index_arrays

        return {"pixel_values": pixels, **vision_index_arrays(h, w, self.merge, self.window_size, self.patch_size)}

    def positions(self, num_before: int, kept: np.ndarray, num_after: int, token_map: TokenMap) -> np.ndarray:
        """[3, S] M-RoPE position ids (temporal, height, width) of the prefill sequence, `original`:
        HF's get_rope_index for the unpruned image, then the pruned tokens' columns removed. Text
        before the image counts up on all three rows; visual token (r, c) is (s, s + r, s + c) with s
        the number of tokens before it; the text after resumes at s + max(rows, cols)."""
        rows, cols = token_map.grids[0]
        kept = np.asarray(kept, dtype=np.int64)
        r, c = np.divmod(kept, cols)
        s = num_before
        before = np.broadcast_to(np.arange(s), (3, s))
        visual = np.stack([np.full(len(kept), s), s + r, s + c])
        start = s + max(rows, cols)
        after = np.broadcast_to(np.arange(start, start + num_after), (3, num_after))
        return np.concatenate([before, visual, after], axis=1).astype(np.int64)


class AnyresLayout:
    """LLaVA-NeXT's anyres tiling with unpadding and `image_newline` tokens."""

    name = "anyres"

    def __init__(self, visual: dict):
        self.tokens_per_crop = int(visual["tokens_per_crop"])
        self.side = int(visual["grid"][0])
        if self.side * self.side != self.tokens_per_crop or visual["grid"][0] != visual["grid"][1]:
            raise InputError(f"anyres needs a square patch grid per crop, got {visual['grid']} for {self.tokens_per_crop} tokens")
        self.crop_size = int(visual["image_size"][0])
        self.pinpoints = [tuple(int(v) for v in p) for p in visual["grid_pinpoints"]]
        self.max_tokens = int(visual["max_tokens"])

    def crop_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of crops for an image of (height, width): its best pinpoint / crop size."""
        from transformers.image_processing_utils import select_best_resolution

        height, width = select_best_resolution(list(image_size), [list(p) for p in self.pinpoints])
        return height // self.crop_size, width // self.crop_size

    def vision_feeds(self, pixels: np.ndarray, image_size, token_map: TokenMap) -> dict[str, np.ndarray]:
        return {"pixel_values": pixels[: token_map.num_crops]}

    def token_map(self, image_size: tuple[int, int]) -> TokenMap:
        h_img, w_img = (int(v) for v in image_size)
        rows, cols = self.crop_grid((h_img, w_img))
        n, side = self.tokens_per_crop, self.side
        num_crops = 1 + rows * cols
        base = np.arange(n)
        if rows * cols == 0:  # pragma: no cover - pinpoints are at least one crop
            raise InputError(f"no crop grid for an image of {w_img}x{h_img}")
        if num_crops == 1:  # a pinpoint equal to the crop size: base view plus one newline (HF)
            return TokenMap(np.append(base, NEWLINE), np.append(np.zeros(n, np.int64), -1), ((side, side),), 1)
        # the stitched patch grid: (rows*side) x (cols*side); token (R, C) comes from crop
        # 1 + (R // side) * cols + C // side, at (R % side) * side + C % side within it
        height, width = rows * side, cols * side
        r0, r1, c0, c1 = _unpadded_window(h_img, w_img, height, width)
        R = np.arange(r0, r1)[:, None]
        C = np.arange(c0, c1)[None, :]
        crop = 1 + (R // side) * cols + C // side
        src = crop * n + (R % side) * side + C % side  # [rows', cols']
        seg = np.broadcast_to(crop, src.shape)
        src = np.concatenate([src, np.full((len(src), 1), NEWLINE)], axis=1).reshape(-1)
        seg = np.concatenate([seg, np.full((len(seg), 1), -1)], axis=1).reshape(-1)
        grids = [(side, side)]
        for c in range(1, num_crops):  # each crop's surviving rectangle
            pr, pc = divmod(c - 1, cols)
            nr = max(0, min(r1, (pr + 1) * side) - max(r0, pr * side))
            nc = max(0, min(c1, (pc + 1) * side) - max(c0, pc * side))
            grids.append((nr, nc))
        return TokenMap(
            np.concatenate([base, src]).astype(np.int64),
            np.concatenate([np.zeros(n, np.int64), seg]).astype(np.int64),
            tuple(grids),
            num_crops,
        )


def _unpadded_window(h_img: int, w_img: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) of a height x width patch grid that cover the image rather
    than its padding (`unpad_image` in transformers' llava_next, on patch units)."""
    if w_img / h_img > width / height:  # wider than the grid: padding above and below
        new_height = int(round(h_img * (width / w_img), 7))
        pad = (height - new_height) // 2
        return pad, height - pad, 0, width
    new_width = int(round(w_img * (height / h_img), 7))
    pad = (width - new_width) // 2
    return 0, height, pad, width - pad


def layout_for(visual: dict):
    kind = visual.get("layout", "single")
    if kind == "single":
        return SingleLayout(visual)
    if kind == "anyres":
        return AnyresLayout(visual)
    if kind == "mrope":
        return MropeLayout(visual)
    raise InputError(f"unknown visual layout '{kind}' in the manifest")


def split_budget(keep: int, counts: list[int]) -> list[int]:
    """Split K over segments in proportion to their token counts (largest remainder; ties to the
    earlier segment). Each share is at most its segment's count and the shares sum to K."""
    total = sum(counts)
    if total == 0:
        return [0] * len(counts)
    exact = [keep * c / total for c in counts]
    shares = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: keep - sum(shares)]:
        shares[i] += 1
    return [min(s, c) for s, c in zip(shares, counts)]
