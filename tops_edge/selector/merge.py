"""Token merging after selection: what the dropped visual tokens leave behind in the kept ones.

A selector keeps K of N visual tokens. With `merge = "mean"` every dropped token is assigned to the
kept token whose projected feature is most similar (cosine), each kept token becomes the mean of its
group (itself included) and carries the group's size n. The decoder adds log(n) to the attention
logits of that cached token in every layer and head (its `attention_bias` input), so the token
weighs in every softmax as n identical tokens would: proportional attention, as in ToMe (Bolya et
al., 2023) for ViTs. The KV cache still holds K tokens.

Why: a pruned sequence changes the share of attention each kind of content gets, and a model that
counts by area (the ShapesVQA model does) then miscounts. First probe (test split, K = 64, TOPS with
spatial 1, 40-50 count questions a run): counting at 48% with selection alone, 72% with the log-size
bias alone, 55% with averaging alone, at the unpruned level with both. The full table is in the
README (Fidelity).
`merge = "none"` keeps the selected tokens as they are (the selection-only baselines' setting).
"""

from __future__ import annotations

import numpy as np

MERGES = ("mean", "none")


def merge_dropped(features: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] of one selection group, kept [K] ascending indices into it ->
    (merged [K, D]: the mean of each kept token's group, sizes [K] int64: the group sizes, >= 1,
    summing to N). A dropped token joins the kept token of highest cosine similarity (the first on
    ties); a kept token is always in its own group."""
    features = np.asarray(features, dtype=np.float32)
    kept = np.asarray(kept, dtype=np.int64)
    n, k = len(features), len(kept)
    if k == 0:
        raise ValueError("merge_dropped needs at least one kept token")
    inv_norm = 1.0 / np.maximum(np.linalg.norm(features, axis=1), 1e-12)
    # cos(i, kept j) = <f_i, f_kj> / (|f_i| |f_kj|); the argmax over j needs only the kept norms
    owner = np.argmax((features @ features[kept].T) * inv_norm[kept], axis=1)
    owner[kept] = np.arange(k)
    sizes = np.bincount(owner, minlength=k)
    assign = np.zeros((k, n), dtype=np.float32)  # one-hot groups: the sums are one matmul
    assign[owner, np.arange(n)] = 1.0
    merged = (assign @ features) / sizes[:, None].astype(np.float32)
    return merged.astype(np.float32, copy=False), sizes.astype(np.int64)


__all__ = ["MERGES", "merge_dropped"]
