"""Index arithmetic of Qwen2.5-VL's vision tower, in numpy, for one image (one frame, t = 1).

The tower's forward in transformers computes three grid-dependent things with Python loops and
`.tolist()` (transformers.vision_utils.get_vision_position_ids / get_vision_window_index), which no
traced graph can hold. Here they are computed at run time from the image grid alone and handed to
the exported vision graph as inputs (see tops_edge.models.qwen_vision.QwenVision):

- `patch_positions` [P, 2] int64: the (row, column) of every patch on the patch grid, in the order
  the image processor emits patches. That order is block-major: the processor groups the patches
  merge x merge blocks at a time (the blocks row-major over the grid, the patches row-major inside a
  block), so patch p sits in block p // merge^2 at offset p % merge^2. These are the ids the 2D
  rotary embedding rotates by; equal to HF's get_vision_position_ids for a (1, grid_h, grid_w) grid.
- `window_index` [N] int64, N = P / merge^2: the permutation of merged tokens (token n = the n-th
  merge block, row-major over the merged grid) that puts them window by window. A window is
  `window_size // merge // patch_size` merged tokens a side, the windows tile the merged grid
  row-major from its top-left corner (the last row / column of windows is cut short when the grid
  does not divide), and inside a window the tokens stay row-major. Equal to HF's window_index;
  the tower permutes its patches (4 at a time) by it before the first block.
- `window_ids` [N] int64: for position j of that permuted order, the index (0, 1, ...) of the window
  the token window_index[j] belongs to. Windows are numbered in the order they appear, so the ids are
  non-decreasing and the runs of equal ids (times merge^2 patches) are HF's cu_window_seqlens
  segments: two patches attend to each other in a windowed block iff their tokens' ids are equal.
"""

from __future__ import annotations

import numpy as np


def vision_index_arrays(grid_h: int, grid_w: int, spatial_merge_size: int, window_size: int,
                        patch_size: int) -> dict[str, np.ndarray]:
    """{"patch_positions" [P, 2], "window_index" [N], "window_ids" [N]} (int64) for one image of
    grid_h x grid_w patches; see the module docstring. The grid sides must be multiples of the merge
    size (the image processor guarantees it)."""
    grid_h, grid_w, merge = int(grid_h), int(grid_w), int(spatial_merge_size)
    if grid_h <= 0 or grid_w <= 0 or grid_h % merge or grid_w % merge:
        raise ValueError(f"a {grid_h}x{grid_w} patch grid does not split into {merge}x{merge} merge blocks")
    side = int(window_size) // merge // int(patch_size)  # merged tokens per window side
    if side <= 0:
        raise ValueError(f"window_size {window_size} is smaller than one merged token ({merge * patch_size} px)")
    merged_h, merged_w = grid_h // merge, grid_w // merge

    # patch p -> block (p // merge^2, row-major over the merged grid), offset inside it row-major
    p = np.arange(grid_h * grid_w, dtype=np.int64)
    block, offset = np.divmod(p, merge * merge)
    block_row, block_col = np.divmod(block, merged_w)
    in_row, in_col = np.divmod(offset, merge)
    patch_positions = np.stack([block_row * merge + in_row, block_col * merge + in_col], axis=1)

    # merged token n -> (row, col) on the merged grid -> its window and its place inside it
    row, col = np.divmod(np.arange(merged_h * merged_w, dtype=np.int64), merged_w)
    windows_w = -(-merged_w // side)  # windows per row, the last one possibly narrower
    window = (row // side) * windows_w + col // side
    # windows in order, then row-major inside each (stable sort: n is already row-major)
    window_index = np.argsort(window * (side * side) + (row % side) * side + col % side, kind="stable")
    # every window of the ceil x ceil tiling holds at least one token, so the ids are already dense
    window_ids = window[window_index]
    return {"patch_positions": patch_positions.astype(np.int64), "window_index": window_index.astype(np.int64),
            "window_ids": window_ids.astype(np.int64)}
