"""The selector interface: one registry; each method is a torch module that is both the reference
and, traced, the ONNX form (standard ops only), so the two cannot drift apart.

Graph IO (names are the contract with the runtime):
  image_features [batch, N, D] float32, keep [] int64  ->  kept_indices [batch, K] int64 (ascending),
  selected_features [batch, K, D] float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class SelectorInfo:
    name: str
    summary: str
    #: builds the module from the visual layout (grid, token count); None = keep everything, no graph
    build: Callable[..., nn.Module] | None


_REGISTRY: dict[str, SelectorInfo] = {}


def register(name: str, summary: str):
    def deco(factory):
        _REGISTRY[name] = SelectorInfo(name, summary, factory)
        return factory

    return deco


def register_identity(name: str, summary: str) -> None:
    _REGISTRY[name] = SelectorInfo(name, summary, None)


def available() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> SelectorInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown selector '{name}'; choose one of: {', '.join(_REGISTRY)}") from None


def check_keep(keep: int, num_tokens: int) -> int:
    """The budget K must be a whole number in [1, N]; one place says so for API, CLI and export."""
    if isinstance(keep, bool) or int(keep) != keep:
        raise InputError(f"--keep must be a whole number, got {keep!r}")
    keep = int(keep)
    if not 1 <= keep <= num_tokens:
        raise InputError(f"--keep {keep} is out of range: this model has {num_tokens} visual tokens per image (1..{num_tokens})")
    return keep


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[B, N, D] x [B, K] -> [B, K, D]."""
    return torch.gather(features, 1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
