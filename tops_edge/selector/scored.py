"""Selectors that rank tokens by a per-token score and keep the top K (torch reference).

- attention: the vision tower's [CLS] attention to each patch (VisionZip / VisPruner family).
- fastv, pdrop (at a decoder cut): the prompt's last token's attention to each alive visual token,
  the last row of text_attention [B,Q,N] (the other rows are not read).
- random: a seeded pseudo-random score, computed with integer arithmetic (a Lehmer generator) so
  torch and ONNX Runtime draw exactly the same subset for a given seed.
Ties go to the lowest index; non-finite scores rank last.
"""

from __future__ import annotations

import torch

from .dpp import INVALID

LEHMER_MODULUS = 2**31 - 1
LEHMER_MULTIPLIER = 48271
LEHMER_ROUNDS = 3


def top_k_ascending(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The K highest scores' indices (ties: lowest index first), returned in ascending order."""
    keep = min(keep, scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    return order.sort(1).values


def attention_select(cls_attention: torch.Tensor, keep: int) -> torch.Tensor:
    a = cls_attention.float()
    return top_k_ascending(torch.where(torch.isfinite(a), a, torch.full_like(a, INVALID)), keep)


def last_token_attention_select(text_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """FastV / PyramidDrop at a cut: the K visual tokens the prompt's last token attends to most.
    text_attention [B,Q,N] -> [B, min(K, N)] ascending; non-finite entries rank last, ties go to the
    lowest index."""
    return attention_select(text_attention[:, -1], keep)


def random_scores(num_tokens: int, seed: int) -> torch.Tensor:
    """Distinct int64 scores for token 0..N-1: a bijection of (seed, i) iterated through Lehmer's map."""
    x = (torch.arange(num_tokens, dtype=torch.int64) + (seed % LEHMER_MODULUS) * num_tokens) % (LEHMER_MODULUS - 1) + 1
    for _ in range(LEHMER_ROUNDS):
        x = x * LEHMER_MULTIPLIER % LEHMER_MODULUS
    return x


def random_select(batch: int, num_tokens: int, keep: int, seed: int) -> torch.Tensor:
    scores = random_scores(num_tokens, seed).to(torch.float64).unsqueeze(0).expand(batch, -1)
    return top_k_ascending(scores, keep)
