"""Next-token choice: greedy at temperature 0, else temperature + nucleus (top-p) with a seeded RNG."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def next_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))  # first maximum on ties, like torch.argmax
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        cut = int(np.searchsorted(cum, top_p)) + 1  # smallest prefix whose mass reaches top_p
        keep = order[:cut]
        probs = np.zeros_like(probs)
        probs[keep] = 1.0
        probs *= np.exp(z - z.max())
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
