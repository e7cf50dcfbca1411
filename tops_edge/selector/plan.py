"""The pruning plan: at which layers visual tokens are pruned and how many each stage keeps.

`--keep T` is the *equivalent average* budget: the mean, over the decoder's L layers, of the visual
tokens each layer processes (the figure FastV and PyramidDrop report their budgets in). A pre-LLM
method keeps T before the first layer, so every layer sees T. An in-LLM method lets the first layers
see all N and keeps fewer later; its `schedule` (base.Schedule, in the registry) picks the cut layers
and the budgets that average closest to T:

- fastv at cut c: layers 0..c-1 see N, layers c..L-1 see K, K = (T L - c N) / (L - c) rounded to the
  nearest integer (halves up). N = 576, L = 32, T = 64: K = 896 / 30 = 29.87 -> 30, averaging 64.125.
  Its smallest average is K = 1: (c N + L - c) / L (37 for LLaVA-1.5 at layer 2).
- pdrop at cuts c_1 < ... < c_S: layers before c_1 see N, stage s keeps b_s = N lambda^s rounded
  (halves up), with lambda in (0, 1] found by bisection so the average is closest to T (ties: the
  larger). Where rounding would repeat a budget (lambda near 1) b_s is b_{s-1} - 1, so budgets
  strictly decrease; a lambda whose last budget rounds to 0 is not allowed, which bounds the average
  from below (160 for LLaVA-1.5's cuts at 8, 16, 24: the first quarter alone averages 144).

T >= N is a plan with no stages (nothing to prune); a T the schedule cannot get down to is an
InputError that names the smallest T it reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError
from .base import Schedule, Unreachable, get

_BISECTION_STEPS = 200  # halvings of lambda in [0, 1]: far past float resolution


@dataclass(frozen=True)
class Stage:
    """One pruning stage."""

    #: 0 = before the LLM (after the projector); c > 0 = at the cut before decoder layer c
    layer: int
    method: str
    #: visual tokens kept from this stage on
    keep: int


@dataclass(frozen=True)
class PruningPlan:
    """Where and how much a method prunes: `stages` ascending in layer, with strictly decreasing keep."""

    stages: tuple[Stage, ...]
    #: N, the image's selectable visual tokens
    num_visual: int
    #: L, the decoder's layers
    num_layers: int

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        _check_count("the number of decoder layers", self.num_layers)
        _check_count("the number of visual tokens", self.num_visual)
        previous_layer = -1
        for stage in self.stages:
            if isinstance(stage.layer, bool) or int(stage.layer) != stage.layer or not (
                    stage.layer == 0 or 1 <= stage.layer <= self.num_layers - 1):
                raise InputError(f"a pruning stage's layer must be 0 (before the LLM) or a cut in "
                                 f"1..{self.num_layers - 1} of a {self.num_layers}-layer model, got {stage.layer}")
            if stage.layer <= previous_layer:
                raise InputError(f"pruning stages must be at ascending layers, got {', '.join(str(s.layer) for s in self.stages)}")
            previous_layer = stage.layer
        if any(isinstance(s.keep, bool) or int(s.keep) != s.keep or s.keep < 1 for s in self.stages):
            raise InputError(f"every pruning stage keeps a whole number >= 1 of visual tokens, got "
                             f"{', '.join(str(s.keep) for s in self.stages)}")
        if any(b.keep >= a.keep for a, b in zip(self.stages, self.stages[1:])):
            raise InputError(f"pruning stages must keep strictly fewer visual tokens each, got "
                             f"{', '.join(str(s.keep) for s in self.stages)}")
        self.check(self.num_visual)

    def tokens_at(self, layer: int) -> int:
        """The visual tokens decoder layer `layer` (0..L-1) processes."""
        if isinstance(layer, bool) or int(layer) != layer or not 0 <= layer < self.num_layers:
            raise InputError(f"layer must be in 0..{self.num_layers - 1} of a {self.num_layers}-layer model, got {layer}")
        tokens = self.num_visual
        for stage in self.stages:
            if stage.layer <= layer:
                tokens = stage.keep
        return tokens

    def average_tokens(self) -> float:
        """The mean over the L layers of tokens_at: the equivalent average visual tokens."""
        return self._total() / self.num_layers

    def cuts(self) -> tuple[int, ...]:
        """The decoder layers (> 0) with a stage: where the decoder is cut."""
        return tuple(s.layer for s in self.stages if s.layer > 0)

    def check(self, num_visual: int | None = None) -> "PruningPlan":
        """The plan against an image of `num_visual` visual tokens (default: the planned N): a stage
        keeping more than the tokens alive before it is an InputError. Returns the plan."""
        alive = self.num_visual if num_visual is None else _check_count("the number of visual tokens", num_visual)
        for stage in self.stages:
            if stage.keep > alive:
                where = "before the LLM" if stage.layer == 0 else f"at layer {stage.layer}"
                raise InputError(f"the {stage.method} stage {where} keeps {stage.keep} visual tokens, but only "
                                 f"{alive} are alive there")
            alive = stage.keep
        return self

    def _total(self) -> int:
        """The sum over the layers of tokens_at (an integer: average_tokens without rounding)."""
        total, layer, tokens = 0, 0, self.num_visual
        for stage in self.stages:
            total += (stage.layer - layer) * tokens
            layer, tokens = stage.layer, stage.keep
        return total + (self.num_layers - layer) * tokens


def plan_for(method: str, params: dict | None, average: int, num_visual: int, num_layers: int) -> PruningPlan:
    """The plan of `method` (with `params` over its defaults) for the equivalent average budget
    `average` (--keep T) on an image of `num_visual` visual tokens and a `num_layers`-layer decoder.
    T >= N, or a method that does not prune, gives a plan with no stages."""
    info = get(method)
    params = info.resolve_params(params)
    num_layers = _check_count("the number of decoder layers", num_layers)
    num_visual = _check_count("the number of visual tokens", num_visual)
    if isinstance(average, bool) or int(average) != average:
        raise InputError(f"--keep must be a whole number, got {average!r}")
    average = int(average)
    if average < 1:
        raise InputError(f"--keep {average} is out of range: the average visual tokens kept must be at least 1")
    layers = stage_layers(method, params, num_layers)
    if not info.prunes or average >= num_visual:
        return PruningPlan((), num_visual, num_layers)
    try:
        budgets = info.schedule.budgets(params, layers, average, num_visual, num_layers)
    except Unreachable as e:
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
        head = f"{method} at {where} of a {num_layers}-layer model"
        if e.smallest is None:
            raise InputError(f"{head} cannot prune {num_visual} visual tokens: each of its {len(layers)} stages "
                             f"drops at least one; cut at fewer layers") from None
        raise InputError(f"{head} cannot average {average} of {num_visual} visual tokens: the smallest it reaches "
                         f"is {e.smallest}; lower the cut layer{'s' if len(layers) > 1 else ''} or raise --keep") from None
    return PruningPlan(tuple(Stage(layer, method, int(keep)) for layer, keep in zip(layers, budgets)),
                       num_visual, num_layers)


def stage_layers(method: str, params: dict | None, num_layers: int) -> tuple[int, ...]:
    """The layers `method` prunes at on a `num_layers`-layer decoder, whatever the budget (0: before
    the LLM). An invalid cut choice is an InputError naming the valid range."""
    info = get(method)
    params = info.resolve_params(params)
    layers = tuple(info.schedule.layers(params, num_layers))
    if any(not (layer == 0 or 1 <= layer <= num_layers - 1) for layer in layers):
        raise InputError(f"{method}'s layers must be cuts in 1..{num_layers - 1} of a {num_layers}-layer model, "
                         f"got {', '.join(map(str, layers))}")
    if list(layers) != sorted(set(layers)):
        raise InputError(f"{method}'s layers must be distinct and ascending, got {', '.join(map(str, layers))}")
    return layers


def cut_layers(method: str, params: dict | None, num_layers: int) -> tuple[int, ...]:
    """The decoder cuts (layers > 0) `method` needs, for any budget: where an export splits the
    decoder into segments (a budget T >= N leaves them unused)."""
    return tuple(layer for layer in stage_layers(method, params, num_layers) if layer > 0)


# --- the in-LLM schedules (registered in methods.py) ----------------------------------------------
def check_cut(owner: str, layer, num_layers: int) -> int:
    """A cut before decoder layer c must be in 1..L-1."""
    if num_layers < 2:
        raise InputError(f"{owner} needs a cut inside the decoder, and a {num_layers}-layer model has none")
    if isinstance(layer, bool) or int(layer) != layer or not 1 <= layer <= num_layers - 1:
        raise InputError(f"{owner} must be a cut in 1..{num_layers - 1} of a {num_layers}-layer model "
                         f"(the cut before that decoder layer), got {layer}")
    return int(layer)


def _fastv_layers(params: dict, num_layers: int) -> tuple[int, ...]:
    return (check_cut("fastv's layer", params["layer"], num_layers),)


def _fastv_budgets(params: dict, layers: tuple[int, ...], average: int, num_visual: int, num_layers: int) -> tuple[int, ...]:
    """K = (T L - c N) / (L - c) to the nearest integer (halves up), in exact integer arithmetic."""
    (cut,) = layers
    excess, width = average * num_layers - cut * num_visual, num_layers - cut
    if excess < width:  # K < 1: the average of K = 1 is above T
        raise Unreachable(-(-(cut * num_visual + width) // num_layers))
    return (min((2 * excess + width) // (2 * width), num_visual - 1),)


FASTV = Schedule(layers=_fastv_layers, budgets=_fastv_budgets)


def parse_layers(text: str, owner: str = "pdrop") -> tuple[int, ...]:
    """'8,16,24' (also '[8, 16, 24]', PyramidDrop's own spelling) -> (8, 16, 24); '' -> ()."""
    body = str(text).strip().strip("[]()").strip()
    if not body:
        return ()
    try:
        layers = tuple(int(part) for part in body.split(","))
    except ValueError:
        raise InputError(f"{owner}'s layers must be comma-separated whole numbers (e.g. 8,16,24), got '{text}'") from None
    if any(layer < 1 for layer in layers) or list(layers) != sorted(set(layers)):
        raise InputError(f"{owner}'s layers must be distinct ascending cuts >= 1, got '{text}'")
    return layers


def quarter_layers(num_layers: int) -> tuple[int, ...]:
    """PyramidDrop's 4 equal stages: cuts at L/4, L/2, 3L/4 rounded (halves up), those in 1..L-1
    (8, 16, 24 of 32; 2, 4, 6 of 8; fewer on a model too shallow for three distinct cuts)."""
    return tuple(sorted({c for c in ((2 * num_layers * s + 4) // 8 for s in (1, 2, 3)) if 1 <= c <= num_layers - 1}))


def _pdrop_layers(params: dict, num_layers: int) -> tuple[int, ...]:
    layers = parse_layers(params["layers"]) or quarter_layers(num_layers)
    if not layers:
        raise InputError(f"pdrop needs a cut inside the decoder, and a {num_layers}-layer model has none")
    for layer in layers:
        check_cut("each of pdrop's layers", layer, num_layers)
    return layers


def geometric_budgets(num_visual: int, stages: int, ratio: float) -> tuple[int, ...]:
    """N ratio^s rounded (halves up) for s = 1..stages, each at most one below the previous."""
    out, previous = [], num_visual
    for s in range(1, stages + 1):
        previous = min(math.floor(num_visual * ratio**s + 0.5), previous - 1)
        out.append(previous)
    return tuple(out)


def _pdrop_budgets(params: dict, layers: tuple[int, ...], average: int, num_visual: int, num_layers: int) -> tuple[int, ...]:
    """The geometric budgets whose average is closest to T, lambda by bisection (the layer-sum is a
    non-decreasing step function of lambda; both sides of the step at T are compared)."""
    ends = layers[1:] + (num_layers,)

    def total(budgets):  # the sum over the layers of the tokens each processes
        return layers[0] * num_visual + sum((end - layer) * keep for layer, end, keep in zip(layers, ends, budgets))

    def at(ratio):
        return geometric_budgets(num_visual, len(layers), ratio)

    found = closest_ratio(at, total, average * num_layers)
    if found is None:
        raise Unreachable(None)
    budgets, smallest = found
    if average * num_layers < smallest:
        raise Unreachable(-(-smallest // num_layers))
    return budgets


def closest_ratio(at, total, target: int):
    """Geometric budgets `at(ratio)` (ratio in (0, 1]) whose layer-sum `total(budgets)` is closest to
    `target` (ties: the larger), among the ratios whose last budget is >= 1: (budgets, the smallest
    such layer-sum); those budgets are the smallest ones when the target is below it. None when even
    ratio 1 leaves the last budget below 1. The layer-sum is a non-decreasing step function of the
    ratio: bisection finds the step at the target and both sides are compared."""
    if at(1.0)[-1] < 1:
        return None
    lo, hi = 0.0, 1.0  # the smallest ratio whose last budget is >= 1: at(lo) is not, at(hi) is
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (lo, mid) if at(mid)[-1] >= 1 else (mid, hi)
    smallest = total(at(hi))
    if target <= smallest:
        return at(hi), smallest
    if total(at(1.0)) <= target:
        return at(1.0), smallest
    lo, hi = hi, 1.0  # total(at(lo)) <= target < total(at(hi))
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if total(at(mid)) <= target else (lo, mid)
    below, above = at(lo), at(hi)
    return (above if total(above) - target <= target - total(below) else below), smallest

PDROP = Schedule(layers=_pdrop_layers, budgets=_pdrop_budgets)



# --- TOPS as published (selector/tops_paper.py; TOPS.md section 1) ---------------------------------
TOPS_STAGE_CHOICES = ("1,2", "1", "2")


def tops_stage_ii_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's Stage II cuts: 3/8 L and 3/4 L rounded (halves up): 12, 24 of 32; 15, 30 of 40;
    3, 6 of 8."""
    return tuple((3 * num_layers * k + 4) // 8 for k in (1, 2))


def _tops_layers(params: dict, num_layers: int) -> tuple[int, ...]:
    stages = str(params["stages"]).replace(" ", "")
    if stages not in TOPS_STAGE_CHOICES:
        raise InputError(f"tops's stages must be '1,2' (both), '1' (Stage I, before the LLM) or '2' (Stage II, inside it), "
                         f"got '{params['stages']}'")
    out = (0,) if "1" in stages else ()
    if "2" in stages:
        cuts = parse_layers(params["layers"], "tops") or tops_stage_ii_layers(num_layers)
        if num_layers < 2 or any(not 1 <= c <= num_layers - 1 for c in cuts) or len(set(cuts)) < len(cuts):
            raise InputError(f"tops's Stage II prunes at cuts {', '.join(map(str, cuts))} (3/8 and 3/4 of the depth), "
                             f"which a {num_layers}-layer model does not have as distinct cuts in 1..{num_layers - 1}; "
                             f"set tops's stages=1 (Stage I only) or its layers=... (the cuts)")
        out += cuts
    return out


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _tops_budgets(params: dict, layers: tuple[int, ...], average: int, num_visual: int, num_layers: int) -> tuple[int, ...]:
    """Stage I keeps 2T; each Stage II cut but the last keeps T/2 and the last keeps what brings the
    layer average to T (the paper's 2T -> T/2 -> T/4 on 32 layers, exactly; its Table 17's rows
    all follow this equal-average rule). Where that leaves the last cut nothing below T/2 (cuts the
    rule does not fit, e.g. layers=2,14, or a shallow model), the Stage II budgets fall geometrically
    from 2T instead, their ratio solved for the average closest to T. Stage II alone (stages=2) keeps
    the same 2:1 ratio between its cuts, both solved for the average. Stage I alone keeps T. Rounded halves up; each stage keeps
    fewer than the one before (at T >= N/2 Stage I keeps N - 1)."""
    starts = layers
    ends = layers[1:] + (num_layers,)
    spans = [end - start for start, end in zip(starts, ends)]
    target = average * num_layers
    if layers == (0,):
        return (average,)
    if layers[0] == 0:  # Stage I, then Stage II
        fixed = [min(2 * average, num_visual - 1)] + [_half_up(average / 2)] * (len(layers) - 2)
        rest = target - sum(b * w for b, w in zip(fixed, spans))
        last = _half_up(rest / spans[-1])
        budgets = fixed + [last]
        if not 1 <= last < fixed[-1]:  # cuts the T/2 rule does not fit (e.g. an early first cut)
            budgets = list(_geometric_after(fixed[0], spans, target))
    else:  # Stage II alone: the layers before the first cut see all N; budgets 2x, ..., 2x, x
        before = layers[0] * num_visual
        weight = 2 * sum(spans[:-1]) + spans[-1]
        x = (target - before) / weight
        if x < 0.5:  # x rounds below 1: the first layers alone already average more than T
            raise Unreachable(-(-(before + weight) // num_layers))
        last = max(1, _half_up(x))
        budgets = [min(2 * last, num_visual - 1)] * (len(layers) - 1) + [last]
    for i in range(1, len(budgets)):  # strictly decreasing, at least 1
        budgets[i] = max(1, min(budgets[i], budgets[i - 1] - 1))
    if budgets[-1] < 1 or any(b >= a for a, b in zip(budgets, budgets[1:])):
        raise Unreachable(None)
    return tuple(budgets)


def _geometric_after(first: int, spans: list[int], target: int) -> tuple[int, ...]:
    """Stage I's `first`, then Stage II budgets first * rho^s (geometric_budgets) with rho in (0, 1)
    by bisection so the layer-sum is closest to `target` (ties: the larger); the layers' spans."""
    def total(budgets):
        return sum(b * w for b, w in zip(budgets, spans))

    def at(ratio):
        return (first, *geometric_budgets(first, len(spans) - 1, ratio))

    found = closest_ratio(at, total, target)
    if found is None:
        raise Unreachable(None)
    return found[0]


TOPS = Schedule(layers=_tops_layers, budgets=_tops_budgets)


def _check_count(what: str, value) -> int:
    try:
        whole = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError):
        whole = False
    if not whole or value < 1:
        raise InputError(f"{what} must be a whole number >= 1, got {value!r}")
    return int(value)
