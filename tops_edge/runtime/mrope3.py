"""Index arithmetic of Qwen3-VL's vision tower, in numpy, for one image (one frame, t = 1).

Qwen3-VL's ViT has no window attention (every block attends over the whole image), but two
grid-dependent things in its forward are computed in transformers with Python-side loops and
`.tolist()` over `grid_thw` (transformers.vision_utils), which no traced graph can hold. Here they
are computed at run time from the image grid alone and handed to the exported vision graph as
inputs (tops_edge.models.qwen3_vision.Qwen3Vision):

- `patch_positions` [P, 2] int64: the (row, column) of every patch on the patch grid, in the order
  the image processor emits patches (block-major: merge x merge blocks row-major over the grid, the
  patches row-major inside a block). The ids the 2D rotary embedding rotates by; equal to HF's
  `get_vision_position_ids` for a (1, grid_h, grid_w) grid (the same as Qwen2.5-VL's).
- `interp_indices` [P, 4] int64 and `interp_weights` [P, 4] float32: the learned absolute position
  embedding. Qwen3-VL keeps a square table of `num_position_embeddings` = side x side vectors and
  resamples it to each image's grid_h x grid_w patch grid by bilinear interpolation with
  align_corners=True (`F.interpolate` semantics: output row r samples source row
  r * (side - 1) / (grid_h - 1), the first and last rows/columns land on the table's edges). Each
  patch's embedding is then sum_k table[interp_indices[p, k]] * interp_weights[p, k] over its four
  bilinear corners, ordered (top-left, top-right, bottom-left, bottom-right) of the source cell:
  flat table index row * side + col. Corners past the table's edge are clamped to it (their weight
  is 0 there). Equal, bit for bit, to HF's `get_vision_interpolation_indices_and_weights(...,
  mode="bilinear", align_corners=True, spatial_merge_size=merge)` for one image: the same float32
  operations in the same order.

No torch here: the runtime loads this module beside onnxruntime.
"""

from __future__ import annotations

import numpy as np


def _patch_rows_cols(grid_h: int, grid_w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of patch p = 0 .. P-1 in the processor's block-major order."""
    p = np.arange(grid_h * grid_w, dtype=np.int64)
    block, offset = np.divmod(p, merge * merge)
    block_row, block_col = np.divmod(block, grid_w // merge)
    in_row, in_col = np.divmod(offset, merge)
    return block_row * merge + in_row, block_col * merge + in_col


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=True) taps [n, 2] int64 into a `side`-long source axis and their
    weights [n, 2] float32, for target positions `index` on an axis of length `size`. float32 as
    transformers computes them."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.int64)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    weights = np.maximum(np.float32(1) - distance, np.float32(0))
    return taps, weights.astype(np.float32)


def vision_index_arrays_qwen3(grid_h: int, grid_w: int, spatial_merge_size: int = 2,
                              num_position_embeddings: int = 2304) -> dict[str, np.ndarray]:
    """{"patch_positions" [P, 2] int64, "interp_indices" [P, 4] int64, "interp_weights" [P, 4]
    float32} for one image of grid_h x grid_w patches; see the module docstring.
    `num_position_embeddings` is the vision config's (a perfect square: the table's side is its
    root, as HF's int(n ** 0.5)). The grid sides must be multiples of the merge size (the image
    processor guarantees it)."""
    grid_h, grid_w, merge = int(grid_h), int(grid_w), int(spatial_merge_size)
    if grid_h <= 0 or grid_w <= 0 or merge <= 0 or grid_h % merge or grid_w % merge:
        raise ValueError(f"a {grid_h}x{grid_w} patch grid does not split into {merge}x{merge} merge blocks")
    side = int(int(num_position_embeddings) ** 0.5)
    if side <= 0 or side * side != int(num_position_embeddings):
        raise ValueError(f"num_position_embeddings {num_position_embeddings} is not a square table")

    row, col = _patch_rows_cols(grid_h, grid_w, merge)
    h_taps, h_weights = _axis_taps(row, grid_h, side)
    w_taps, w_weights = _axis_taps(col, grid_w, side)
    # separable 2D: (h0, w0), (h0, w1), (h1, w0), (h1, w1)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return {"patch_positions": np.stack([row, col], axis=1).astype(np.int64),
            "interp_indices": indices.astype(np.int64), "interp_weights": weights.astype(np.float32)}
