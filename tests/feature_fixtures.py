"""Synthetic visual tokens shaped like a real image's: a plain background, a few objects and a smooth
positional signal with a decaying spectrum (a ViT's position embeddings). Their similarity matrix
has a few large eigenvalues and a fast-decaying tail, as measured on the ShapesVQA model's features
(median pairwise cosine 0.9996), which is the regime where a greedy DPP exhausts its kernel."""

from __future__ import annotations

import numpy as np


def image_like_tokens(side: int, seed: int, width: int = 32, hidden: int = 8, amp: float = 0.3):
    """(image_features [1,N,hidden], vision_features [1,N,width]) float32 numpy, N = side^2, row-major grid."""
    rng = np.random.default_rng(seed)
    n = side * side
    protos = rng.standard_normal((4, width)) + 2.0  # background + three object kinds
    label = np.zeros(n, dtype=int)
    label[rng.choice(n, n // 6, replace=False)] = rng.integers(1, 4, n // 6)
    row, col = np.divmod(np.arange(n), side)
    waves = np.stack([np.cos(np.pi * f * row / side) * np.cos(np.pi * h * col / side) * 0.5 ** (f + h)
                      for f in range(4) for h in range(4)], 1)
    vision = protos[label] + amp * waves @ rng.standard_normal((16, width))
    image = rng.standard_normal((hidden, width)) @ vision.T  # the projector: a linear map of the same tokens
    return image.T[None].astype(np.float32), vision[None].astype(np.float32)
