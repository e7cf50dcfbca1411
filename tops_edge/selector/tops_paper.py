"""TOPS as published (arXiv 2606.27161; docs: TOPS.md section 1): the torch reference of the
registry's `tops` (selector/methods.py registers it; its schedule is plan.TOPS).

One TOPS pass, the same at every stage, on features h [B,N,D] and a relevance r [B,N]:
  sim    = cos(h_i, h_j)                                           once, O(N^2 D)
  seed   S = {argmax r}
  m_j    = max_{k in S} sim(h_j, h_k)                              updated after each pick
  d_i    = 1 - m_i                                                 semantic diversity
  c_i    = sum_{j not in S} max(0, sim(h_i, h_j) - m_j)            information coverage (facility location)
  pick   argmax_{i not in S}  w_r r~_i + lam c~_i + alpha d~_i     until |S| = K; output ascending
where ~ normalises a term over the current candidates: `norm="minmax"` (x - min) / (max - min), the
paper's text; `norm="mean"` x / mean, its algorithm boxes. w_r is the `relevance` switch (1 on, 0
off), alpha = 0 and lam = 0 switch diversity and coverage off: the paper's criteria ablation. Cost:
the coverage is a masked row sum over an N x N matrix, O(N^2) per step, O(K N^2) in all.

Stages: "vision" (Stage I, before the LLM) takes r = the vision tower's [CLS] attention
(`cls_attention`); "llm" (Stage II, at a decoder cut) takes r from the dynamic text raters
(`text_rater_relevance`), read off the cut's text_attention with the prompt's hidden states
`text_features` [B,Q,D], a graph input the registry's contract does not have yet.

Readings the paper leaves open (each is a parameter or a named constant):
  - sim is cosine (the paper writes sim without defining it).
  - the seed is argmax r whether or not the relevance term is on (its ablation does not say how the
    "diversity only" / "coverage only" runs were seeded); the argmax is taken on r min-max
    normalised over the valid tokens, so its tie tolerance is relative to r's spread (r is in
    attention units, often ~1e-3).
  - r~ is normalised over the current candidates at every step, like c~ and d~ (the paper says "after
    min-max normalization" once for r and c; r is fixed, so over all tokens or over the candidates
    only differs in which spread it divides by).
  - the coverage sum runs over every token not in S, the candidate itself included (its own term is
    1 - m_i = d_i), as the paper's sum over U = V \\ S does.
  - text raters: the paper only says "text-visual relevance thresholding" and names SparseVLM (a
    baseline with authors in common) for "text rater tokens". We take SparseVLM's released rule,
    computed afresh at each cut ("dynamic") from that layer's hidden states: relevance of prompt
    token q = mean over valid visual tokens v of softmax over q of h_v . t_q; raters = the q above
    the mean relevance (1/Q: the softmax rows sum to 1) by more than RATER_TOL of it. Neither the
    paper nor SparseVLM's code scales the logits: `rater_scaling="none"` (default), or "sqrt_d"
    for h_v . t_q / sqrt(D) as in attention. When no prompt token is above the mean (Q = 1,
    identical prompt tokens) every valid prompt token rates.

Robustness (every stage): all arithmetic is fp32 whatever the input dtype. A degenerate token
(non-finite or zero feature row, or non-finite relevance) is never picked while a valid candidate
remains; it is not a candidate in any normalisation; as a zero row it adds nothing to a coverage sum.
Two fp32 GEMMs (torch batched or not, ONNX Runtime) round a cosine differently in its last bits, and
min-max normalisation would blow such noise up into whole-unit score differences when a term is
flat (after a duplicate of a kept token is the only candidate left, its d and c are pure rounding
noise). So: d and each coverage term are hinged at SIM_TOL (max(0, x - SIM_TOL)), which makes them
exactly 0 where they are noise; a term whose spread (minmax) or |mean| (mean) over the candidates is
at most NORM_TOL times its largest |value| there is constant and contributes 0; scores within
dpp.TIE_TOL of the best are ties, won by the lowest index. A text token with a non-finite or zero
hidden state is not a prompt token (a zero row can pad a batch of prompts of different lengths); a
non-finite text_attention entry is left out of the raters' mean at its visual token, and a token with
no finite rater entry has no relevance (degenerate); with no valid prompt token at all, r = 0.
"""

from __future__ import annotations

from typing import Any

import torch

from . import dpp
from .dpp import INVALID, row_norms, sanitize

SIM_TOL = 1e-5  # hinge on d and on each coverage term (cosine units): far above fp32 GEMM noise
NORM_TOL = 1e-5  # a term whose spread (or |mean|) is at most this times its largest |value| is flat
RATER_TOL = 1e-4  # a text rater's relevance is above the mean by more than this factor of it

NORMS = ("minmax", "mean")
RATER_SCALINGS = ("none", "sqrt_d")
STAGES = ("vision", "llm")

#: defaults by stage (TOPS.md): Stage I alpha = lam = 0.5 for every model; Stage II (0.5, 0.5) is
#: LLaVA-1.5-7B's at 77.8% pruned (and LLaVA-NeXT-7B's at 77.8% and 94.4%); 88.9% uses lam = 1.0
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "vision": {"alpha": 0.5, "lam": 0.5, "norm": "minmax", "relevance": 1.0},
    "llm": {"alpha": 0.5, "lam": 0.5, "norm": "minmax", "relevance": 1.0, "rater_scaling": "none"},
}


# --- the greedy pass ------------------------------------------------------------------------------
def normalise(x: torch.Tensor, cand: torch.Tensor, norm: str) -> torch.Tensor:
    """`x` [B,N] normalised over the candidates `cand` [B,N] (0 for a flat term; see the module doc).
    Non-candidate entries are meaningless (callers mask them)."""
    zero = torch.zeros((), dtype=x.dtype)
    if norm == "minmax":
        inf = torch.tensor(float("inf"), dtype=x.dtype)
        lo = torch.where(cand, x, inf).amin(-1, keepdim=True)
        hi = torch.where(cand, x, -inf).amax(-1, keepdim=True)
        spread = hi - lo
        scale = torch.maximum(lo.abs(), hi.abs())
        return torch.where(spread > NORM_TOL * scale, (x - lo) / spread, zero)
    if norm == "mean":
        count = cand.to(x.dtype).sum(-1, keepdim=True)
        mean = torch.where(cand, x, zero).sum(-1, keepdim=True) / count.clamp_min(1.0)
        big = torch.where(cand, x.abs(), zero).amax(-1, keepdim=True)
        return torch.where(mean.abs() > NORM_TOL * big, x / mean, zero)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def step_terms(sim: torch.Tensor, m: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coverage c, diversity d) [B,N] given sim [B,N,N], m [B,N] and the candidates [B,N] (the
    tokens not in S that are valid; invalid ones are zero rows and would add 0 anyway)."""
    d = torch.relu((1.0 - m) - SIM_TOL)
    gain = torch.relu((sim - m.unsqueeze(1)) - SIM_TOL)  # [b, i, j]: what i adds to j's best match
    c = torch.where(cand.unsqueeze(1), gain, torch.zeros((), dtype=gain.dtype)).sum(-1)
    return c, d


def step_scores(sim, m, cand, r, *, alpha: float, lam: float, norm: str, relevance_weight: float) -> torch.Tensor:
    """[B,N] w_r r~ + lam c~ + alpha d~ over the candidates (meaningless elsewhere)."""
    c, d = step_terms(sim, m, cand)
    return (relevance_weight * normalise(r, cand, norm) + lam * normalise(c, cand, norm)) + alpha * normalise(d, cand, norm)


def prepare(features: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sim [B,N,N] fp32 cosine, r [B,N] with 0 at degenerate tokens, validity [B,N])."""
    unit, valid = sanitize(features)
    r = relevance.float()
    valid = valid & torch.isfinite(r)
    r = torch.where(valid, r, torch.zeros((), dtype=r.dtype))
    return unit @ unit.transpose(1, 2), r, valid


def tops_order(features: torch.Tensor, relevance: torch.Tensor, keep: int, *, alpha: float, lam: float,
               norm: str = "minmax", relevance_weight: float = 1.0) -> torch.Tensor:
    """[B, min(K, N)] token indices in the order the greedy picks them (see the module doc)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    sim, r, valid = prepare(features, relevance)
    b, n = r.shape
    keep = min(int(keep), n)
    rows = torch.arange(b)
    penalty = torch.where(valid, torch.zeros_like(r), torch.full_like(r, INVALID))
    j = dpp.argmax_first(torch.where(valid, normalise(r, valid, "minmax"), penalty))  # seed: argmax r
    penalty[rows, j] = float("-inf")
    m = sim[rows, j]
    order = [j]
    for _ in range(keep - 1):
        cand = penalty == 0
        score = step_scores(sim, m, cand, r, alpha=alpha, lam=lam, norm=norm, relevance_weight=relevance_weight)
        j = dpp.argmax_first(torch.where(cand, score, penalty))
        penalty[rows, j] = float("-inf")
        m = torch.maximum(m, sim[rows, j])
        order.append(j)
    return torch.stack(order, 1)


def tops_select(features: torch.Tensor, relevance: torch.Tensor, keep: int, *, alpha: float, lam: float,
                norm: str = "minmax", relevance_weight: float = 1.0) -> torch.Tensor:
    """The TOPS greedy pass: [B, min(K, N)] kept indices, ascending. features [B,N,D] (any float
    dtype; fp32 inside), relevance [B,N]; K >= N keeps every token."""
    return tops_order(features, relevance, keep, alpha=alpha, lam=lam, norm=norm,
                      relevance_weight=relevance_weight).sort(1).values


# --- Stage II relevance: the dynamic text raters --------------------------------------------------
def text_raters(features: torch.Tensor, text_features: torch.Tensor, *, rater_scaling: str = "none") -> torch.Tensor:
    """[B,Q] bool: the prompt tokens whose relevance to the visual tokens (mean over valid visual
    tokens v of softmax over valid prompt tokens q of h_v . t_q, / sqrt(D) with "sqrt_d") is above
    the mean relevance; every valid prompt token when none is."""
    if rater_scaling not in RATER_SCALINGS:
        raise ValueError(f"rater_scaling must be one of {', '.join(RATER_SCALINGS)}, got {rater_scaling!r}")
    h, _, valid_v = row_norms(features)  # raw rows (degenerate ones zeroed)
    t, _, valid_t = row_norms(text_features)
    zero = torch.zeros((), dtype=torch.float32)
    logits = h @ t.transpose(1, 2)  # [B,N,Q]
    if rater_scaling == "sqrt_d":
        logits = logits * (1.0 / torch.sqrt(torch.tensor(float(features.shape[-1]), dtype=torch.float32)))
    vt = valid_t.unsqueeze(1)  # [B,1,Q]
    top = torch.where(vt, logits, torch.tensor(float("-inf"))).amax(-1, keepdim=True)
    e = torch.where(vt, torch.exp(logits - top), zero)
    p = e / e.sum(-1, keepdim=True).clamp_min(1.0)  # softmax over the valid prompt tokens
    vv = valid_v.unsqueeze(-1)  # [B,N,1]
    rel = torch.where(vv, p, zero).sum(1) / vv.to(torch.float32).sum(1).clamp_min(1.0)  # [B,Q]
    count = valid_t.to(torch.float32).sum(-1, keepdim=True)
    mean = torch.where(valid_t, rel, zero).sum(-1, keepdim=True) / count.clamp_min(1.0)
    raters = valid_t & (rel > mean * (1.0 + RATER_TOL))
    return torch.where(raters.any(-1, keepdim=True), raters, valid_t)


def text_rater_relevance(features: torch.Tensor, text_features: torch.Tensor, text_attention: torch.Tensor, *,
                         rater_scaling: str = "none") -> torch.Tensor:
    """Stage II relevance [B,N]: r_v = mean over the text raters q (`text_raters`) of
    text_attention[:, q, v] (the cut layer's head-averaged attention), finite entries only; NaN
    where no rater has a finite entry (the token is then degenerate); 0 everywhere when there is no
    valid prompt token at all.

    features [B,N,D]: the alive visual tokens' hidden states at the cut; text_features [B,Q,D]: the
    hidden states of the Q prompt tokens after the image there; text_attention [B,Q,N]."""
    raters = text_raters(features, text_features, rater_scaling=rater_scaling)
    a = text_attention.float()
    use = raters.unsqueeze(-1) & torch.isfinite(a)  # [B,Q,N]
    count = use.to(torch.float32).sum(1)
    total = torch.where(use, a, torch.zeros((), dtype=torch.float32)).sum(1)
    # no valid prompt token at all: no relevance signal, r = 0 (the pass runs on coverage and diversity)
    missing = torch.where(raters.any(-1, keepdim=True), torch.tensor(float("nan")), torch.zeros(()))
    return torch.where(count > 0, total / count.clamp_min(1.0), missing)


# --- what the registry needs ----------------------------------------------------------------------
def _stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    return stage


def default_params(stage: str) -> dict[str, Any]:
    return dict(DEFAULT_PARAMS[_stage(stage)])


def check_params(params: dict, stage: str) -> dict[str, Any]:
    """`params` with every name of the stage's defaults, checked; an InputError names the bad one."""
    from ..errors import InputError

    known = DEFAULT_PARAMS[_stage(stage)]
    p = {**known, **{k: v for k, v in params.items() if k in known}}
    for name in ("alpha", "lam", "relevance"):
        try:
            value = float(p[name])
        except (TypeError, ValueError):
            value = float("nan")
        if not 0.0 <= value < float("inf"):
            raise InputError(f"{name} must be a finite number >= 0 (0 switches its criterion off), got {p[name]}")
        p[name] = value
    if p["norm"] not in NORMS:
        raise InputError(f"norm must be one of {', '.join(NORMS)}, got '{p['norm']}'")
    if stage == "llm" and p["rater_scaling"] not in RATER_SCALINGS:
        raise InputError(f"rater_scaling must be one of {', '.join(RATER_SCALINGS)}, got '{p['rater_scaling']}'")
    return p


def tops_paper_inputs(params: dict, stage: str) -> tuple[str, ...]:
    """The graph inputs beyond image_features and keep, in the ONNX form's order."""
    check_params(params, stage)
    return ("cls_attention",) if stage == "vision" else ("text_attention", "text_features")


def stage_relevance(x: dict, params: dict, stage: str) -> torch.Tensor:
    """r [B,N] for the stage: cls_attention (vision), the text raters' attention (llm)."""
    p = check_params(params, stage)
    if stage == "vision":
        return x["cls_attention"]
    return text_rater_relevance(x["image_features"], x["text_features"], x["text_attention"],
                                rater_scaling=p["rater_scaling"])


def tops_paper_reference(x: dict, keep: int, params: dict, stage: str) -> torch.Tensor:
    """[B, min(K, N)] ascending kept indices from the graph inputs `x` (name -> tensor)."""
    p = check_params(params, stage)
    return tops_select(x["image_features"], stage_relevance(x, p, stage), keep, alpha=p["alpha"], lam=p["lam"],
                       norm=p["norm"], relevance_weight=p["relevance"])


def tops_paper_onnx(params: dict, stage: str):
    """(onnxscript function, constants for onnx_graph.build_graph), as methods._dpp_onnx returns.

    Graph inputs once the constants are initializers: image_features [B,N,D] float32, keep [] int64
    (the budget K, a run-time input: one Loop of min(K, N) - 1 steps after the seed), then
    `tops_paper_inputs(params, stage)`: cls_attention [B,N] ("vision"), or text_attention [B,Q,N]
    and text_features [B,Q,D] ("llm"). Outputs: kept_indices [B,K] int64 ascending,
    selected_features [B,K,D]. Constants (float32 scalars): alpha, lam, relevance, and for "llm"
    rater_sqrt_d (1: logits / sqrt(D), 0: unscaled). `norm` picks the graph (min-max or mean)."""
    from . import tops_paper_forms as F

    p = check_params(params, stage)
    constants = {"alpha": ("float32", p["alpha"]), "lam": ("float32", p["lam"]),
                 "relevance": ("float32", p["relevance"])}
    mean = p["norm"] == "mean"
    if stage == "vision":
        return (F.tops_paper_vision_mean_graph if mean else F.tops_paper_vision_graph), constants
    constants["rater_sqrt_d"] = ("float32", 1.0 if p["rater_scaling"] == "sqrt_d" else 0.0)
    return (F.tops_paper_cut_mean_graph if mean else F.tops_paper_cut_graph), constants


__all__ = ["DEFAULT_PARAMS", "NORMS", "RATER_SCALINGS", "check_params", "default_params", "normalise",
           "stage_relevance", "step_scores", "step_terms", "text_rater_relevance", "text_raters",
           "tops_order", "tops_paper_inputs", "tops_paper_onnx", "tops_paper_reference", "tops_select"]


# --- the registered method's parameters ------------------------------------------------------------
#: Stage II lam the paper publishes per model and pruned fraction (its Tables 7-8; Stage I is
#: alpha = lam = 0.5 everywhere, Stage II alpha = 0.5 for these models): (pruned fraction, lam)
PUBLISHED_STAGE_II_LAM: dict[str, tuple[tuple[float, float], ...]] = {
    "llava-1.5": ((1 - 128 / 576, 0.5), (1 - 64 / 576, 1.0), (1 - 32 / 576, 1.0)),
    "llava-next": ((1 - 640 / 2880, 0.5), (1 - 320 / 2880, 0.4), (1 - 160 / 2880, 0.5)),
    # Qwen2.5-VL-7B: one published setting, (alpha, lam) = (0.5, 0.4), at every budget it reports
    "qwen2.5-vl": ((0.0, 0.4),),
}

#: the registry's `tops` defaults: Stage I (alpha, lam), Stage II (alpha2, lam2: "auto" = the
#: published value for the budget), the per-stage norm and rater rule, the ablation switches
#: (relevance / coverage / diversity weights on every stage; stages "1,2" | "1" | "2") and
#: Stage II's cuts ("" = 3/8 L, 3/4 L)
REGISTRY_PARAMS: dict[str, Any] = {
    "alpha": 0.5, "lam": 0.5, "alpha2": 0.5, "lam2": "auto", "norm": "minmax", "rater_scaling": "none",
    "relevance": 1.0, "coverage": 1.0, "diversity": 1.0, "stages": "1,2", "layers": "",
}


def published_lam(pruned: float, family: str = "llava-1.5") -> float:
    """The paper's Stage II lam at the published pruned fraction nearest `pruned` (ties: the lower)."""
    table = PUBLISHED_STAGE_II_LAM[family]
    return min(table, key=lambda row: (abs(row[0] - pruned), row[0]))[1]


def stage_ii_lam(params: dict, average: float, num_visual: int, family: str = "llava-1.5") -> float:
    """Stage II's lam for an equivalent average of `average` of `num_visual` tokens: lam2 as a
    number, or ("auto") the published value for that pruned fraction; times the coverage switch."""
    from ..errors import InputError

    value = params["lam2"]
    if str(value).strip().lower() == "auto":
        lam = published_lam(1.0 - float(average) / float(num_visual), family)
    else:
        try:
            lam = float(value)
        except (TypeError, ValueError):
            lam = float("nan")
        if not 0.0 <= lam < float("inf"):
            raise InputError(f"lam2 must be 'auto' (the paper's value for the budget) or a finite number >= 0, got {value}")
    return lam * _switch(params, "coverage")


def _switch(params: dict, name: str) -> float:
    from ..errors import InputError

    try:
        value = float(params[name])
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value < float("inf"):
        raise InputError(f"{name} must be a finite weight >= 0 (0 switches that criterion off, 1 keeps it), got {params[name]}")
    return value


def stage_params(params: dict, stage: str, lam: float | None = None) -> dict[str, Any]:
    """The registry's parameters as one stage's (tops_select's): Stage I's alpha/lam, or Stage II's
    alpha2 and `lam` (from stage_ii_lam; None: lam2 itself, which must then be a number), each times
    its switch; relevance, norm and rater_scaling shared."""
    diversity, coverage = _switch(params, "diversity"), _switch(params, "coverage")
    if stage == "vision":
        out = {"alpha": float(params["alpha"]) * diversity, "lam": float(params["lam"]) * coverage}
    else:
        out = {"alpha": float(params["alpha2"]) * diversity,
               "lam": float(params["lam2"]) * coverage if lam is None else float(lam),
               "rater_scaling": params["rater_scaling"]}
    out.update(norm=params["norm"], relevance=_switch(params, "relevance"))
    return check_params(out, stage)
