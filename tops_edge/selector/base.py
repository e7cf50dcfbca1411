"""The selector registry: every method has a torch reference and an ONNX form that must agree.

Selector graph IO (the names are the contract with the runtime, which feeds what a graph asks for):
  image_features [B,N,D] float32   the projected visual tokens (what the LLM sees)
  keep [] int64                    the budget K, a run-time input (K >= N keeps everything)
  instruction_embeds [B,M,D] float32 + instruction_mask [B,M] int64   the user's text (dpp-merge, cdpruner)
  vision_features [B,N,E] float32  the vision tower's features before the projector (similarity)
  cls_attention [B,N] float32      the vision tower's [CLS] attention to each token (attention)
  text_attention [B,Q,N] float32   at a decoder cut (stage "llm": fastv, pdrop): the head-averaged
                                   attention of the last layer before the cut from the Q prompt tokens
                                   after the image (the last row: the prompt's last token) to each of
                                   the N visual tokens still alive; image_features are then their
                                   hidden states entering the cut's layer
  text_features [B,Q,D] float32    at a decoder cut: those Q prompt tokens' hidden states there
  lam [] float32                   at a decoder cut: tops's Stage II coverage weight, published per
                                   budget (fed by the runtime from the plan; SelectorInfo.cut_feeds)
  target_features [B,N,D] float32  at topv's cut: the alive visual tokens after the cut layer's
                                   post-attention norm (the segment before the cut's probe output)
  token_positions [B,N,2] float32  at a cut: the alive tokens' (row, col) on the patch grid
  -> kept_indices [B,K] int64 ascending, selected_features [B,K,D] float32

A method's `stage` says where it runs: "vision" (before the LLM, on the projected tokens), "llm"
(at cuts inside the decoder) or "both" (its own fields before the LLM, a `CutForm` at the cuts; it
exports a `selector` and a `cut_selector` graph). Its `schedule` says at which layers and with which
budgets, given the equivalent average budget --keep T (selector/plan.py turns the two into a
PruningPlan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import InputError

INSTRUCTION = ("instruction_embeds", "instruction_mask")
STAGES = ("vision", "llm", "both")


@dataclass(frozen=True)
class CutForm:
    """The in-LLM stage of a method that also prunes before the LLM (stage "both"): what its graph at
    a decoder cut reads and computes, as SelectorInfo's own fields do for its stage before the LLM."""

    extra_inputs: Callable[[dict], tuple[str, ...]]
    reference: Callable[..., torch.Tensor]
    onnx_form: Callable[[dict, tuple[int, int]], tuple[Any, dict]]


class Unreachable(Exception):
    """A schedule cannot average the asked budget: `smallest` is the smallest whole-number average
    it reaches (None: it cannot prune these tokens at all). plan.plan_for words it as an InputError."""

    def __init__(self, smallest: int | None):
        super().__init__(smallest)
        self.smallest = smallest


@dataclass(frozen=True)
class Schedule:
    """How a method spends the equivalent average budget T over the decoder's L layers.

    layers(params, L) -> the stage layers, ascending (0 = before the LLM; c > 0 = at the cut before
    decoder layer c); an invalid choice is an InputError naming the valid range.
    budgets(params, layers, T, N, L) -> the visual tokens kept from each stage on, for 1 <= T < N,
    strictly decreasing, each in 1..N-1, chosen so the mean over the L layers of the tokens each layer
    processes is as close to T as the method's form allows; raises Unreachable when it cannot get
    down to T.
    """

    layers: Callable[[dict, int], tuple[int, ...]]
    budgets: Callable[[dict, tuple[int, ...], int, int, int], tuple[int, ...]]


#: the pre-LLM schedule of every "vision" method: one stage before the LLM keeping T
PRE_LLM = Schedule(layers=lambda params, num_layers: (0,),
                   budgets=lambda params, layers, average, num_visual, num_layers: (average,))


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
    #: where it prunes: "vision" (before the LLM, on the projected tokens), "llm" (at decoder cuts;
    #: reads text_attention and the alive tokens' hidden states) or "both" (the fields above before
    #: the LLM, `cut` at the cuts)
    stage: str = "vision"
    #: where and how much it keeps for an equivalent average budget T (plan.plan_for)
    schedule: Schedule = PRE_LLM
    #: stage "both": the form of its stages at decoder cuts
    cut: CutForm | None = None
    #: the token merging its stage before the LLM gets unless told otherwise ("mean" or "none";
    #: the runtime's, selector/merge.py): the export's --merge default
    merge: str = "mean"
    #: run-time scalar inputs of its graph at decoder cuts that depend on the plan (e.g. a weight
    #: published per budget): (params, plan, layout) -> {input name: value}
    cut_feeds: Callable[[dict, Any, str], dict[str, Any]] | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"selector '{self.name}': stage must be one of {', '.join(STAGES)}, got '{self.stage}'")
        if (self.stage == "both") != (self.cut is not None):
            raise ValueError(f"selector '{self.name}': a cut form goes with stage 'both', and only with it")
        if self.merge not in ("mean", "none"):
            raise ValueError(f"selector '{self.name}': merge must be 'mean' or 'none', got '{self.merge}'")

    def form(self, at: str) -> tuple[Callable, Callable, Callable]:
        """(extra_inputs, reference, onnx_form) of the method's stage before the LLM (`at` "vision")
        or at a decoder cut (`at` "llm")."""
        if at == "llm" and self.stage == "both":
            return self.cut.extra_inputs, self.cut.reference, self.cut.onnx_form
        if at not in ("vision", "llm") or (self.stage != "both" and at != self.stage):
            raise ValueError(f"selector '{self.name}' has no stage '{at}' (it prunes at: {self.stage})")
        return self.extra_inputs, self.reference, self.onnx_form

    @property
    def stages(self) -> tuple[str, ...]:
        """Where its graphs run: ("vision",), ("llm",) or ("vision", "llm")."""
        return ("vision", "llm") if self.stage == "both" else (self.stage,)

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
            kind = type(params[key])
            try:
                params[key] = kind(value)
            except (TypeError, ValueError):
                what = {int: "a whole number", float: "a number"}.get(kind, f"a {kind.__name__}")
                raise InputError(f"selector '{self.name}': {key} takes {what}, got {value!r}") from None
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


def check_keep(keep: int, num_tokens: int, owner: str = "this model has {n} visual tokens per image") -> int:
    """The budget K must be a whole number in [1, N]; one place says so for API, CLI and export.
    `owner` words whose N it is (an anyres image's count depends on the image)."""
    if isinstance(keep, bool) or int(keep) != keep:
        raise InputError(f"--keep must be a whole number, got {keep!r}")
    keep = int(keep)
    if not 1 <= keep <= num_tokens:
        raise InputError(f"--keep {keep} is out of range: {owner.format(n=num_tokens)} (1..{num_tokens})")
    return keep


def check_keep_ratio(ratio: float) -> float:
    """A budget as a fraction of the image's visual tokens: a number in (0, 1]."""
    if isinstance(ratio, bool):
        raise InputError(f"--keep-ratio must be a number in (0, 1], got {ratio!r}")
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise InputError(f"--keep-ratio must be a number in (0, 1], got {ratio!r}") from None
    if not 0.0 < value <= 1.0:
        raise InputError(f"--keep-ratio {ratio} is out of range: it is the fraction of visual tokens kept, in (0, 1]")
    return value


def keep_from_ratio(ratio: float, num_tokens: int) -> int:
    """K = ceil(ratio * N), at least 1: the paper's 0.222 of LLaVA-NeXT's 2880 tokens is 640, and of
    LLaVA-1.5's 576 it is 128 (the tolerance keeps an exact product such as 0.3 * 10 at 3)."""
    import math

    return min(num_tokens, max(1, math.ceil(check_keep_ratio(ratio) * num_tokens - 1e-6)))


def token_grid(grid, num_tokens: int) -> tuple[int, int]:
    """The (rows, cols) the tokens lie on; a sequence that is not a grid (e.g. with [CLS]) is 1 x N."""
    gh, gw = grid
    return (int(gh), int(gw)) if gh * gw == num_tokens else (1, num_tokens)

