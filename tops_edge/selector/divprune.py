"""DivPrune (torch reference): greedy max-min diversity on the cosine distance 1 - cos(f_i, f_j).

The first token is the most isolated one (largest distance to its nearest neighbour); each next one
maximises its distance to the nearest token already kept. No instruction. Degenerate tokens are
never chosen over finite ones; ties go to the lowest index.
"""

from __future__ import annotations

import torch

from .dpp import INVALID, argmax_first, sanitize


def divprune_select(features: torch.Tensor, keep: int) -> torch.Tensor:
    f, valid = sanitize(features)
    b, n, _ = f.shape
    keep = min(keep, n)
    dist = 1.0 - f @ f.transpose(1, 2)
    # nearest-neighbour distance, over valid neighbours only and never to oneself
    blocked = torch.eye(n, dtype=torch.bool).unsqueeze(0) | ~valid.unsqueeze(2)
    nearest = torch.where(blocked, torch.full_like(dist, float("inf")), dist).amin(1)
    penalty = torch.where(valid, torch.zeros_like(nearest), torch.full_like(nearest, INVALID))
    rows = torch.arange(b)
    score = nearest
    order = []
    for step in range(keep):
        j = argmax_first(score + penalty)
        penalty[rows, j] = float("-inf")
        score = dist[rows, j] if step == 0 else torch.minimum(score, dist[rows, j])
        order.append(j)
    return torch.stack(order, 1).sort(1).values
