"""The registered methods: each pairs its torch reference with its ONNX form.

The seeds as published: `tops` (the TOPS paper, arXiv 2606.27161; selector/tops_paper.py: one greedy
pass before the LLM on [CLS]-attention relevance, two at 3/8 L and 3/4 L on the text raters'
attention; schedule plan.TOPS; no merging) and `topv` (TopV, CVPR 2025; selector/topv.py: Sinkhorn at
cut 2 between the layer's input visual states and its post-attention-norm outputs).

Our own variant, `dpp-merge` (wave 1's method, once registered as `tops`; not the paper's), and
`cdpruner` use alpha = 0.5 (CDPruner's theta = 0.5) and compute similarity on the vision features
before the projector (1024 wide on LLaVA-1.5 instead of 4096: 4x cheaper, see
scripts/selector_cost.py). `cdpruner` keeps CDPruner's released semantics (relevance sign -1, found
for CLIP features; no spatial factor). `dpp-merge` multiplies the similarity by a Gaussian of grid
distance, sigma = spatial * sqrt(N/K) (dpp.spatial_factor), with spatial = 2 chosen on ShapesVQA's
val split with the runtime's token merging on (docs/selectors.md, the `dpp-merge` section: 1.5 to 3
is a plateau, 1 and below lose tokens of small objects at K <= 64; without merging 1 was best); its
alpha, beta and sign were left where they were: on that split they moved accuracy by less than the noise.

The in-LLM baselines (stage "llm") prune at decoder cuts, from the attention of the layer before the
cut (text_attention, base.py); both keep the tokens the prompt's last token attends to most, and
differ in where and how much (their schedules, plan.py):

- fastv (FastV, Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"): one cut after
  layer K (K = 2 in the paper, our `layer`), keeping the top (1 - R) of the visual tokens (R = 50% in
  the paper). The paper ranks by "the average attention-score one token received from all other
  tokens"; its released code ranks by the head-averaged attention of the last token, taken from the
  attention map layer K-1 outputs (the layer before the cut): that is what we do. The kept count is
  not R here but K from --keep T (the equivalent average over all layers, plan.py).
- pdrop (PyramidDrop, Xing et al., 2024, arXiv 2410.17247): the LLM in S stages, ending each with a
  drop to a fixed ratio lambda of the previous stage's tokens; LLaVA-1.5: S = 4 equal stages (its
  layer_list 8, 16, 24 of 32: our cuts before decoder layers 8, 16, 24) and lambda = 0.5 (keeping
  288, 144, 72 of 576). Its released code ranks by the last instruction token's attention to the
  image tokens, softmax over the whole row, head-averaged, and keeps int(N lambda^s). Our readings,
  as parameters: `layers` ('' = the quarters of the model's depth, rounded; else comma-separated
  cuts) and lambda solved from --keep T (plan.py) instead of fixed, budgets rounded. One difference
  with the released code: it computes that attention row afresh with the next stage's first layer's
  own query/key projections on the states entering it; we use the attention of the last layer
  before the cut, as fastv does (what the segmented decoder outputs).

- topv (TopV, CVPR 2025, arXiv 2503.18278; selector/topv.py, TOPS.md section 2): one cut at layer
  `layer` (2, "following FastV"), fastv's schedule and budget arithmetic. It reads no attention and
  no text: an optimal-transport plan between the visual tokens' hidden states entering that layer
  (image_features, the sources) and the same tokens after that layer's post-attention norm
  (target_features), on a cost of feature distance, grid distance (token_positions) and distance to
  the image centre; it keeps the tokens with the largest share of the plan plus a stride of the
  rest. Our reading of where the targets come from: the segment that ends at the cut also runs the
  next layer's attention sub-block on the whole (unpruned) prompt as a probe and outputs it
  (`cut_target_features`, models/base.py DecoderSegment; the export asks for it only where the
  selector at a cut reads target_features); the selector picks; then the next segment runs that
  layer itself on the kept rows only, so its KV cache, and every later one, holds only kept tokens.
  Positions are (row, col) on LLaVA-1.5's patch grid; LLaVA-NeXT's anyres sequences (a base view
  and stitched crops on two different grids) are refused, see `refuse_layout`.
"""

from __future__ import annotations

from dataclasses import replace

from . import onnx_forms as F
from . import tops_paper as TP
from . import topv as TV
from .base import INSTRUCTION, CutForm, SelectorInfo, register
from .divprune import divprune_select
from .dpp import dpp_select
from .plan import FASTV, PDROP, TOPS, check_cut, parse_layers
from .scored import LEHMER_ROUNDS, attention_select, last_token_attention_select, random_select
from .uniform import UniformGrid

SIMILARITY = ("vision", "projected")


def _similarity_inputs(params) -> tuple[str, ...]:
    if params["similarity"] not in SIMILARITY:
        from ..errors import InputError

        raise InputError(f"similarity must be one of {', '.join(SIMILARITY)}, got '{params['similarity']}'")
    return ("vision_features",) if params["similarity"] == "vision" else ()


def _dpp_reference(x, keep, p, grid):
    sim = x["vision_features"] if p["similarity"] == "vision" else None
    return dpp_select(x["image_features"], x["instruction_embeds"], x["instruction_mask"], keep,
                      alpha=p["alpha"], beta=p["beta"], sign=p["relevance_sign"], vision_features=sim,
                      spatial=_spatial(p), grid=grid)


def _spatial(p) -> float:
    value = float(p["spatial"])
    if not value >= 0.0 or value == float("inf"):
        from ..errors import InputError

        raise InputError(f"spatial must be a finite number >= 0 (0 switches the spatial factor off), got {p['spatial']}")
    return value


def _dpp_inputs(p) -> tuple[str, ...]:
    return INSTRUCTION + _similarity_inputs(p) + ("grid_h", "grid_w")


def _dpp_onnx(p, grid):
    vision = p["similarity"] == "vision"
    constants = {"alpha": ("float32", p["alpha"]), "sign": ("float32", p["relevance_sign"]),
                 "spatial": ("float32", _spatial(p))}
    if p["beta"] == 0:  # the plain greedy MAP loop: no coverage work at all
        return (F.dpp_map_vision_graph if vision else F.dpp_map_graph), constants
    constants["beta"] = ("float32", p["beta"])
    return (F.dpp_coverage_vision_graph if vision else F.dpp_coverage_graph), constants


register(SelectorInfo(
    name="dpp-merge",
    summary="our DPP variant: relevance x coverage x diversity greedy on a conditional DPP kernel, with token merging",
    params={"alpha": 0.5, "beta": 0.5, "relevance_sign": 1.0, "similarity": "vision", "spatial": 2.0},
    extra_inputs=_dpp_inputs,
    reference=_dpp_reference,
    onnx_form=_dpp_onnx,
))

register(SelectorInfo(
    name="cdpruner",
    summary="CDPruner: conditional-DPP greedy MAP (dpp-merge's kernel with beta = 0)",
    params={"alpha": 0.5, "beta": 0.0, "relevance_sign": -1.0, "similarity": "vision", "spatial": 0.0},
    extra_inputs=_dpp_inputs,
    reference=_dpp_reference,
    onnx_form=_dpp_onnx,
))


register(SelectorInfo(
    name="divprune",
    summary="DivPrune: greedy max-min diversity on 1 - cos (instruction-agnostic)",
    params={"similarity": "projected"},
    extra_inputs=_similarity_inputs,
    reference=lambda x, keep, p, grid: divprune_select(
        x["vision_features"] if p["similarity"] == "vision" else x["image_features"], keep),
    onnx_form=lambda p, grid: (F.divprune_vision_graph if p["similarity"] == "vision" else F.divprune_graph, {}),
))

register(SelectorInfo(
    name="attention",
    summary="the tokens the vision tower's [CLS] attends to most (VisionZip / VisPruner family)",
    extra_inputs=lambda p: ("cls_attention",),
    reference=lambda x, keep, p, grid: attention_select(x["cls_attention"], keep),
    onnx_form=lambda p, grid: (F.attention_graph, {}),
))


register(SelectorInfo(
    name="uniform",
    summary="an evenly spaced spatial grid (instruction-agnostic baseline)",
    reference=lambda x, keep, p, grid: UniformGrid(*grid).select(x["image_features"], keep),
    # the grid is a graph input: an anyres image's crops each have their own (unpadded) rectangle
    extra_inputs=lambda p: ("grid_h", "grid_w"),
    onnx_form=lambda p, grid: (F.uniform_graph, {}),
))

register(SelectorInfo(
    name="random",
    summary="a seeded pseudo-random subset (the same for every image)",
    params={"seed": 0},
    reference=lambda x, keep, p, grid: random_select(x["image_features"].shape[0], x["image_features"].shape[1], keep, p["seed"]),
    onnx_form=lambda p, grid: (F.random_graph, {"seed": ("int64", p["seed"]), "rounds": ("int64", LEHMER_ROUNDS)}),
))


def _check_cut_layer(owner: str, layer) -> int:
    """A one-cut method's `layer`: a decoder cut >= 1 (the model's depth bounds it in plan.py)."""
    if isinstance(layer, bool) or int(layer) != layer or layer < 1:
        from ..errors import InputError

        raise InputError(f"{owner}'s layer must be a decoder cut >= 1 (the cut before that decoder layer), got {layer}")
    return int(layer)


def _fastv_inputs(p) -> tuple[str, ...]:
    _check_cut_layer("fastv", p["layer"])
    return ("text_attention",)


def _pdrop_inputs(p) -> tuple[str, ...]:
    parse_layers(p["layers"])  # the format; the range needs the model's depth (plan.stage_layers)
    return ("text_attention",)


def _last_token_reference(x, keep, p, grid):
    return last_token_attention_select(x["text_attention"], keep)


register(SelectorInfo(
    name="fastv",
    summary="FastV: at one decoder cut, the visual tokens the prompt's last token attends to most",
    params={"layer": 2},
    extra_inputs=_fastv_inputs,
    reference=_last_token_reference,
    onnx_form=lambda p, grid: (F.last_token_attention_graph, {}),
    stage="llm",
    schedule=FASTV,
))

register(SelectorInfo(
    name="pdrop",
    summary="PyramidDrop: at several decoder cuts, each stage keeping a fixed ratio by the last instruction token's attention",
    params={"layers": ""},
    extra_inputs=_pdrop_inputs,
    reference=_last_token_reference,
    onnx_form=lambda p, grid: (F.last_token_attention_graph, {}),
    stage="llm",
    schedule=PDROP,
))

def _tops_check(p) -> dict:
    """Every parameter of the registered tops checked (a bad one is an InputError naming it)."""
    TP.stage_params(p, "vision")
    TP.stage_params(p, "llm", TP.stage_ii_lam(p, 1, 2))  # lam2 ("auto" or a number) at any budget
    parse_layers(p["layers"], "tops")
    return p


def _tops_vision_inputs(p) -> tuple[str, ...]:
    return TP.tops_paper_inputs(TP.stage_params(_tops_check(p), "vision"), "vision")


def _tops_vision_reference(x, keep, p, grid):
    return TP.tops_paper_reference(x, keep, TP.stage_params(p, "vision"), "vision")


def _tops_vision_onnx(p, grid):
    return TP.tops_paper_onnx(TP.stage_params(_tops_check(p), "vision"), "vision")


def _tops_cut_inputs(p) -> tuple[str, ...]:
    _tops_check(p)
    return ("text_attention", "text_features", "lam")


def _tops_cut_reference(x, keep, p, grid):
    return TP.tops_paper_reference(x, keep, TP.stage_params(p, "llm", float(x["lam"])), "llm")


def _tops_cut_onnx(p, grid):
    fn, constants = TP.tops_paper_onnx(TP.stage_params(_tops_check(p), "llm", 0.0), "llm")
    del constants["lam"]  # a graph input: the runtime feeds the budget's value (cut_feeds)
    return fn, constants


def _tops_cut_feeds(p, plan, layout: str) -> dict:
    import numpy as np

    family = {"anyres": "llava-next", "mrope": "qwen2.5-vl"}.get(layout, "llava-1.5")
    return {"lam": np.array(TP.stage_ii_lam(p, plan.average_tokens(), plan.num_visual, family), dtype=np.float32)}


register(SelectorInfo(
    name="tops",
    summary="TOPS (arXiv 2606.27161): relevance + coverage + diversity greedy, before the LLM and at 3/8 and 3/4 of its depth",
    params=dict(TP.REGISTRY_PARAMS),
    extra_inputs=_tops_vision_inputs,
    reference=_tops_vision_reference,
    onnx_form=_tops_vision_onnx,
    stage="both",
    schedule=TOPS,
    cut=CutForm(extra_inputs=_tops_cut_inputs, reference=_tops_cut_reference, onnx_form=_tops_cut_onnx),
    merge="none",
    cut_feeds=_tops_cut_feeds,
))

def _topv_inputs(p) -> tuple[str, ...]:
    _check_cut_layer("topv", p["layer"])
    TV.check_params(p)  # alpha .. recover, each named when bad
    return TV.TOPV_INPUTS


#: fastv's one cut and budget arithmetic, its layer's range worded for topv
_TOPV_SCHEDULE = replace(FASTV, layers=lambda p, num_layers: (check_cut("topv's layer", p["layer"], num_layers),))

#: the inputs of a graph at a decoder cut that only a probe of the next layer provides (DecoderSegment `probe`)
PROBED_INPUTS = ("target_features",)


def refuse_layout(method: str, params: dict, layout: str) -> None:
    """An InputError where `method` cannot run on a visual layout: topv's token_positions are (row,
    col) on one patch grid, and an anyres sequence (LLaVA-NeXT: a base view and the stitched crops,
    two grids of different scales) has no single grid to read TopV's spatial and centre terms on
    without inventing a convention; refused rather than guessed."""
    from .base import get

    info = get(method)
    if not info.prunes or "llm" not in info.stages:
        return
    if layout == "anyres" and "token_positions" in info.form("llm")[0](params):
        from ..errors import InputError

        raise InputError(f"selector '{method}' reads token positions on one patch grid, which LLaVA-NeXT's anyres "
                         "sequence (a base view plus stitched crops) does not have; it runs on single-grid "
                         "(LLaVA-1.5) models in this version")


register(SelectorInfo(
    name="topv",
    summary="TopV: at one decoder cut, the visual tokens carrying most of a Sinkhorn transport plan from their "
            "states to their post-attention-norm states (feature + spatial + centre cost), plus a stride of the rest",
    params={"layer": 2, **TV.DEFAULT_PARAMS},
    extra_inputs=_topv_inputs,
    reference=lambda x, keep, p, grid: TV.topv_reference(x, keep, p),
    onnx_form=lambda p, grid: TV.topv_onnx(p),
    stage="llm",
    schedule=_TOPV_SCHEDULE,
    merge="none",
))

register(SelectorInfo(name="none", summary="keep every visual token (no pruning)"))


def probe_cuts(method: str, params: dict, num_layers: int) -> tuple[int, ...]:
    """The decoder cuts at which `method`'s graph reads an input only a probe of the next layer gives
    (PROBED_INPUTS: topv's target_features): the segments ending there must output
    `cut_target_features` (models/base.py DecoderSegment). Empty for every other method."""
    from .base import get
    from .plan import cut_layers

    info = get(method)
    if not info.prunes or "llm" not in info.stages:
        return ()
    if not any(name in PROBED_INPUTS for name in info.form("llm")[0](params)):
        return ()
    return cut_layers(method, params, num_layers)
