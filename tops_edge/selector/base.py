"""The selector registry: every method has a torch reference and an ONNX form that must agree.

Selector graph IO (the names are the contract with the runtime, which feeds what a graph asks for):
  image_features [B,N,D] float32   the projected visual tokens (what the LLM sees)
  keep [] int64                    the budget K, a run-time input (K >= N keeps everything)
  instruction_embeds [B,M,D] float32 + instruction_mask [B,M] int64   the user's text (tops, cdpruner)
  vision_features [B,N,E] float32  the vision tower's features before the projector (similarity)
  cls_attention [B,N] float32      the vision tower's [CLS] attention to each token (attention)
  -> kept_indices [B,K] int64 ascending, selected_features [B,K,D] float32
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import InputError

INSTRUCTION = ("instruction_embeds", "instruction_mask")


@dataclass(frozen=True)
class SelectorInfo:
    name: str
    summary: str
    #: default export-time parameters (recorded in the manifest)
    params: dict[str, Any] = field(default_factory=dict)
    #: graph inputs beyond image_features and keep, given the parameters
    extra_inputs: Callable[[dict], tuple[str, ...]] = lambda params: ()
    #: torch reference: (inputs by graph name, keep, params, grid) -> [B, K] ascending indices
    reference: Callable[[dict[str, torch.Tensor], int, dict, tuple[int, int]], torch.Tensor] | None = None
    #: ONNX form: (params, grid) -> (onnxscript function, constants for onnx_graph.build_graph)
    onnx_form: Callable[[dict, tuple[int, int]], tuple[Any, dict]] | None = None

    @property
    def prunes(self) -> bool:
        return self.reference is not None

    def resolve_params(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with `overrides`; unknown names are an input error."""
        params = dict(self.params)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key not in params:
                known = ", ".join(params) or "none"
                raise InputError(f"selector '{self.name}' has no parameter '{key}' (its parameters: {known})")
            params[key] = type(params[key])(value)
        return params


_REGISTRY: dict[str, SelectorInfo] = {}


def register(info: SelectorInfo) -> SelectorInfo:
    _REGISTRY[info.name] = info
    return info


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


def token_grid(grid, num_tokens: int) -> tuple[int, int]:
    """The (rows, cols) the tokens lie on; a sequence that is not a grid (e.g. with [CLS]) is 1 x N."""
    gh, gw = grid
    return (int(gh), int(gw)) if gh * gw == num_tokens else (1, num_tokens)

