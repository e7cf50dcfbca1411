"""`uniform`: an evenly spaced spatial grid over the patch grid, for any budget K.

Rows R = min(H, ceil(sqrt(K * H / W))); the K points are spread over the rows as evenly as integers
allow, and each row's points evenly over its W columns. Every index is distinct and they come out
ascending (row-major). K = H * W gives the identity. A token sequence without a grid (e.g. one that
keeps [CLS]) uses H = 1: evenly spaced over the sequence.
"""

from __future__ import annotations

import torch


class UniformGrid:
    def __init__(self, grid_h: int, grid_w: int):
        self.h, self.w = grid_h, grid_w

    def indices(self, keep: torch.Tensor) -> torch.Tensor:
        """[K] int64 indices for a 0-d int64 budget; integer arithmetic except one correctly rounded sqrt."""
        h, w = self.h, self.w
        k = keep.reshape(())
        rows = torch.ceil(torch.sqrt(k.to(torch.float32) * h / w)).to(torch.int64).clamp(1, h)
        j = torch.arange(k, dtype=torch.int64)
        r = torch.div((j + 1) * rows - 1, k, rounding_mode="floor")
        start = torch.div(r * k, rows, rounding_mode="floor")
        count = torch.div((r + 1) * k, rows, rounding_mode="floor") - start
        col = torch.div((2 * (j - start) + 1) * w, 2 * count, rounding_mode="floor")
        row = torch.div((2 * r + 1) * h, 2 * rows, rounding_mode="floor")
        return row * w + col

    def select(self, features: torch.Tensor, keep: int) -> torch.Tensor:
        """[B, K] ascending indices, the same for every item of the batch."""
        k = min(keep, self.h * self.w)
        return self.indices(torch.tensor(k)).unsqueeze(0).expand(features.shape[0], -1)
