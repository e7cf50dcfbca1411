"""TopV (CVPR 2025, arXiv 2503.18278; docs: TOPS.md section 2): the torch reference of the registry's
`topv` (selector/methods.py); its ONNX form is topv_forms.py.

TopV prunes once, at prefill, at a decoder cut (LLM layer 2, "following FastV"). It scores the
visual tokens with an optimal-transport problem between
  sources s_i  the visual tokens' hidden states entering the pruning layer   (`image_features`)
  targets t_j  the same tokens after that layer's post-attention norm         (`target_features`)
on a visual-aware cost, solved by a few Sinkhorn iterations (paper: 3), and keeps the tokens with
the largest share of the plan, plus a uniformly spaced subset of the pruned ones.

One pass, on sources/targets [B,N,D], positions p [B,N,2] ((row, col) on the patch grid, in patches):
  F_ij = |s_i - t_j|                            feature (L2) distance        min-max over the matrix
  S_ij = 1 - exp(-|p_i - p_j|^2 / (2 sigma^2))  relative spatial distance    min-max over the matrix
  c_i  = |p_i - centre|                         absolute central distance    min-max over the tokens
  C_ij = alpha F_ij + beta S_ij + gamma c_i
  mu = nu = 1/V (uniform over the V valid tokens); log K = -C / epsilon
  Sinkhorn, log domain, from g = 0: `iterations` times a row scaling f then a column scaling g
      f_i = log mu - LSE_j(log K_ij + g_j)      g_j = log nu - LSE_i(log K_ij + f_i)
  P_ij = exp(f_i + log K_ij + g_j)               the plan after the final column scaling
  importance_i = sum_j P_ij                      (ranked by its log, f_i + LSE_j(log K_ij + g_j))
  keep   K - R tokens by importance, highest first (ties: the lowest index), then
  recover R of the remaining (pruned) tokens on a uniform stride over their index order.

What the paper settles: the layer (2), sources and targets as above, the three cost factors (feature
similarity as an L2 distance, relative spatial distance through a Gaussian of the grid distance,
absolute distance of the source to the image centre) weighted by alpha, beta, gamma, Sinkhorn with 3
iterations, importance = a source token's contribution in the transport plan, and that the tokens
of low importance are the ones pruned (its abstract says so in as many words), so **higher
importance is kept first**; then the recovery of uniformly spaced pruned tokens ("every 4th-6th")
for structural integrity. It publishes no code and none of the constants.

Our readings (TOPS.md; each a parameter, defaults to be measured by the fidelity benchmark):
  - each cost term min-max normalised to [0, 1] over the valid entries (a flat term counts 0); the
    spatial term is 1 - exp(-d^2 / 2 sigma^2) with sigma in patches; the centre is the midpoint of
    the valid tokens' bounding box on the grid (the grid's centre when every token is alive, as at
    TopV's layer 2: the grid size is not an input).
  - uniform marginals; entropic epsilon, log-domain Sinkhorn; an iteration is a row scaling then a
    column scaling, so the plan ends on a column scaling. Why: after a row scaling every row of the
    plan sums to its marginal 1/V and the "contribution" carries nothing; after the column scaling
    row i sums to sum_j P'_ij / (V colsum'_j), which is large for a source that is (almost) the only
    cheap supplier of its targets and small for one of many interchangeable (redundant) sources.
  - the recovered count R = floor(recover * K) (float32 arithmetic, as the ONNX form does it),
    at most K - 1 (so at least one token is kept by importance): `recover` is a fraction of the
    budget, default 0.2, i.e. R ~ K/5: one kept token in every 5 comes from the stride (our
    reading of "every 4th-6th", per TOPS.md; recover = 1/4 .. 1/6 spans the paper's range).
  - the stride: the remaining tokens in index order (valid ones; degenerate ones only when fewer
    valid ones remain than R), W of them, give R picks at positions floor((2r + 1) W / (2R)),
    r = 0..R-1: the middle of each of R equal stretches. With W = R every remaining token is taken
    (so K >= N is the identity).

A consequence of uniform marginals worth knowing (tested): a cost term that depends on the source
only (gamma c_i) multiplies row i of the kernel by a constant, which the next row scaling divides
out exactly. Every iteration starts with a row scaling, so under this reading the centre term does
not change the plan (it would after a lone column scaling, where central rows carry more). The
reference even subtracts each row's minimum cost before the exponent (`log_kernel_of`, exact for the
same reason), which removes the centre term up to rounding, and exactly when alpha = beta = 0: then
every token ties and the first K - R by index are kept. gamma stays a parameter and in the cost, as
the paper has it, so that another reading (e.g. non-uniform source marginals) can give it an effect.

Two more consequences of the reading, measured, for whoever sets the defaults:
  - the spatial term favours the border: a border token's nearby targets have fewer other cheap
    suppliers, so after the column scaling it carries more (tested on identical tokens: corners
    first, the centre last; on tests/feature_fixtures' image-like tokens, 24 x 24, K = 144, without
    recovery, 56% of the kept tokens lie on the outer ring, which holds 16% of all). The centre term, which could pull the other way,
    cancels (above).
  - a cost that is (nearly) a sum of a row and a column term gives a (nearly) rank-one kernel,
    which Sinkhorn balances in one iteration: the importance is then (nearly) uniform. The feature
    term is close to that when sources and targets differ in scale or are high-dimensional and
    weakly correlated (|s_i - t_j|^2 = |s_i|^2 + |t_j|^2 - 2 s_i.t_j), and more iterations flatten
    any importance (a converged plan's rows all sum to 1/V). Where the spread of log-importances is
    ~1e-4 (random 4096-d tokens), fp32 rounding (~2e-6 between torch and ONNX Runtime) decides.

Robustness: all arithmetic is fp32 whatever the input dtype. A token is degenerate when its source
or target row is non-finite or zero, or its position is non-finite. Degenerate tokens take no part
in the transport problem (no mass, no cost entries, not in any normalisation); they rank below every
valid token in both the importance order and the recovery (so one is kept only when K exceeds the
valid tokens), among themselves by index. Log-importances within TIE_TOL of each other tie (see
`snap_ties`), and ties go to the lowest index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .dpp import INVALID, row_norms

NORM_TOL = 1e-6  # a term whose spread over its entries is at most this times its largest |value| is flat
TIE_TOL = 2e-5  # log-importances this close tie (torch and ONNX Runtime differ by ~2e-6 at N = 576)

#: defaults (ours: the paper gives none but the 3 iterations); recover 0.2 -> R ~ K/5
DEFAULT_PARAMS: dict[str, Any] = {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "sigma": 3.0, "epsilon": 0.1,
                                  "iterations": 3, "recover": 0.2}

#: the graph inputs beyond image_features (the sources) and keep, in the ONNX form's order
TOPV_INPUTS = ("target_features", "token_positions")


# --- the pieces ------------------------------------------------------------------------------------
def validity(sources: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor):
    """(sources, targets with degenerate rows zeroed, positions with non-finite ones zeroed, all fp32;
    validity [B,N])."""
    s, _, valid_s = row_norms(sources)
    t, _, valid_t = row_norms(targets)
    p = positions.float()
    finite_p = torch.isfinite(p).all(-1)
    valid = valid_s & valid_t & finite_p
    p = torch.where(finite_p.unsqueeze(-1), p, torch.zeros((), dtype=torch.float32))
    return s, t, p, valid


def minmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` min-max normalised to [0, 1] over the entries where `mask` (per batch item: every axis but
    the first); 0 for a flat term; entries outside the mask are meaningless (callers mask them)."""
    dims = tuple(range(1, x.dim()))
    inf = torch.tensor(float("inf"), dtype=x.dtype)
    lo = torch.where(mask, x, inf).amin(dims, keepdim=True)
    hi = torch.where(mask, x, -inf).amax(dims, keepdim=True)
    spread = hi - lo
    scale = torch.maximum(lo.abs(), hi.abs())
    return torch.where(spread > NORM_TOL * scale, (x - lo) / spread, torch.zeros((), dtype=x.dtype))


def topv_cost(sources: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, *,
              alpha: float, beta: float, gamma: float, sigma: float) -> torch.Tensor:
    """C [B,N,N] (rows: sources, columns: targets) from sanitised fp32 inputs (`validity`); entries of
    degenerate rows or columns are meaningless."""
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    ss = (sources * sources).sum(-1)
    tt = (targets * targets).sum(-1)
    d2 = (ss.unsqueeze(2) + tt.unsqueeze(1)) - 2.0 * (sources @ targets.transpose(1, 2))
    feature = minmax(torch.sqrt(torch.relu(d2)), pair)
    dp = positions.unsqueeze(2) - positions.unsqueeze(1)  # [B,N,N,2]
    grid2 = (dp * dp).sum(-1)
    sig = torch.tensor(float(sigma), dtype=torch.float32)  # 2 sigma^2 in float32, as the ONNX form
    spatial = minmax(1.0 - torch.exp(-grid2 / (2.0 * (sig * sig))), pair)
    inf = torch.tensor(float("inf"))
    lo = torch.where(valid.unsqueeze(-1), positions, inf).amin(1, keepdim=True)
    hi = torch.where(valid.unsqueeze(-1), positions, -inf).amax(1, keepdim=True)
    off = positions - (lo + hi) * 0.5
    centre = minmax(torch.sqrt((off * off).sum(-1)), valid)
    return (alpha * feature + beta * spatial) + gamma * centre.unsqueeze(2)


def _lse(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum exp over `dim` of the entries where `mask`, keepdim; -inf where there are none."""
    x = torch.where(mask, x, torch.tensor(float("-inf")))
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype))
    return torch.log(torch.exp(x - m).sum(dim, keepdim=True)) + m


def sinkhorn_potentials(log_kernel: torch.Tensor, valid: torch.Tensor, scalings: int):
    """(f [B,N,1], g [B,1,N]) after `scalings` alternating scalings, row first, from g = 0, with
    uniform marginals 1/V over the valid tokens (f, g are 0 at degenerate tokens). TopV runs
    2 * iterations of them (ending on a column scaling); an odd count ends on a row scaling."""
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    count = valid.to(torch.float32).sum(1).reshape(-1, 1, 1)
    log_mu = -torch.log(count.clamp_min(1.0))
    zero = torch.zeros((), dtype=torch.float32)
    f = torch.zeros_like(log_kernel[:, :, :1])
    g = torch.zeros_like(log_kernel[:, :1, :])
    for step in range(scalings):
        if step % 2 == 0:
            f = torch.where(valid.unsqueeze(2), log_mu - _lse(log_kernel + g, pair, 2), zero)
        else:
            g = torch.where(valid.unsqueeze(1), log_mu - _lse(log_kernel + f, pair, 1), zero)
    return f, g


def log_kernel_of(cost: torch.Tensor, valid: torch.Tensor, epsilon: float) -> torch.Tensor:
    """-(C_ij - min_j C_ij) / epsilon [B,N,N] (the minimum over valid j). Subtracting a constant from
    row i multiplies row i of the kernel by a constant, which the first row scaling (and every later
    one) divides out exactly: the plan is the same, the potentials stay small, and so do the
    rounding differences between backends."""
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    low = torch.where(pair, cost, torch.tensor(float("inf"))).amin(2, keepdim=True)
    low = torch.where(valid.unsqueeze(2), low, torch.zeros((), dtype=torch.float32))
    return -(cost - low) / epsilon


def transport_plan(cost: torch.Tensor, valid: torch.Tensor, epsilon: float, scalings: int) -> torch.Tensor:
    """P [B,N,N] = exp(f_i + log K_ij + g_j) after `scalings` scalings (on the row-centred kernel of
    `log_kernel_of`: the same plan); 0 on degenerate pairs."""
    log_kernel = log_kernel_of(cost, valid, epsilon)
    f, g = sinkhorn_potentials(log_kernel, valid, scalings)
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    return torch.where(pair, torch.exp((log_kernel + f) + g), torch.zeros((), dtype=torch.float32))


def log_importance(cost: torch.Tensor, valid: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """[B,N] log of importance_i = sum_j P_ij after `iterations` row + column scalings; INVALID at
    degenerate tokens (the score TopV ranks by, highest first)."""
    log_kernel = log_kernel_of(cost, valid, epsilon)
    f, g = sinkhorn_potentials(log_kernel, valid, 2 * iterations)
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    score = (f + _lse(log_kernel + g, pair, 2)).squeeze(2)
    return torch.where(valid, score, torch.full_like(score, INVALID))


def recovered_count(keep: int, recover: float) -> int:
    """R = min(floor(recover * K), K - 1), the product in float32 (as the ONNX form computes it)."""
    product = torch.tensor(float(recover), dtype=torch.float32) * torch.tensor(float(keep), dtype=torch.float32)
    return max(0, min(int(torch.floor(product).item()), keep - 1))


def snap_ties(score: torch.Tensor) -> torch.Tensor:
    """[B,N] each score raised to the highest score at most TIE_TOL above it. The map is monotone (the
    order is kept) and sends a group of scores within rounding of each other (duplicates, which two
    backends sum in different orders) to one value, so that the lowest index wins among them."""
    near = score.unsqueeze(1) <= (score + TIE_TOL).unsqueeze(2)  # [b, i, j]: s_j <= s_i + tol
    return torch.where(near, score.unsqueeze(1), torch.tensor(float("-inf"))).amax(2)


def keep_with_recovery(score: torch.Tensor, valid: torch.Tensor, keep: int, recover: float) -> torch.Tensor:
    """[B, min(K, N)] ascending: the K - R best `score`s (within TIE_TOL: the lowest index, see
    `snap_ties`; degenerate tokens carry INVALID), then R of the rest on a uniform stride over their
    index order (valid ones first)."""
    b, n = score.shape
    keep = min(int(keep), n)
    r = recovered_count(keep, recover)
    top = torch.sort(snap_ties(score), dim=1, descending=True, stable=True).indices[:, : keep - r]
    in_top = torch.zeros_like(valid).scatter(1, top, True)
    index = torch.arange(n, dtype=torch.int64).expand(b, n)
    key = torch.where(in_top, 2 * n + index, torch.where(valid, index, n + index))
    rest = key.sort(1).indices  # the pruned tokens, valid ones first, each group in index order
    left = (valid & ~in_top).sum(1, keepdim=True)  # W: the valid pruned tokens
    width = torch.maximum(left, torch.tensor(r))
    step = torch.arange(r, dtype=torch.int64)
    at = torch.div((2 * step + 1) * width, max(2 * r, 1), rounding_mode="floor")
    recovered = torch.gather(rest, 1, at)
    return torch.cat([top, recovered], 1).sort(1).values


# --- the selection ---------------------------------------------------------------------------------
def topv_select(sources: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor, keep: int, *,
                alpha: float, beta: float, gamma: float, sigma: float, epsilon: float, iterations: int,
                recover: float) -> torch.Tensor:
    """TopV's selection: [B, min(K, N)] kept indices, ascending (see the module doc). sources,
    targets [B,N,D] (any float dtype; fp32 inside), positions [B,N,2] (row, col) in patches."""
    s, t, p, valid = validity(sources, targets, positions)
    cost = topv_cost(s, t, p, valid, alpha=alpha, beta=beta, gamma=gamma, sigma=sigma)
    return keep_with_recovery(log_importance(cost, valid, epsilon, iterations), valid, keep, recover)


def token_positions(visual_indices, grid_h: int, grid_w: int) -> np.ndarray:
    """(row, col) float32 [..., 2] of each alive token from its index in its image's (row-major)
    visual sequence of grid_h x grid_w patches; `visual_indices` any int array."""
    from ..errors import InputError

    idx = np.asarray(visual_indices)
    if isinstance(grid_h, bool) or isinstance(grid_w, bool) or int(grid_h) != grid_h or int(grid_w) != grid_w \
            or grid_h < 1 or grid_w < 1:
        raise InputError(f"the token grid must be whole numbers >= 1, got {grid_h} x {grid_w}")
    if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= grid_h * grid_w):
        raise InputError(f"visual token indices must be integers in [0, {grid_h * grid_w}) for a "
                         f"{grid_h} x {grid_w} grid")
    row, col = np.divmod(idx.astype(np.int64), int(grid_w))
    return np.stack([row, col], -1).astype(np.float32)


# --- what the registry needs -----------------------------------------------------------------------
def check_params(params: dict) -> dict[str, Any]:
    """`params` with every name of DEFAULT_PARAMS, checked; an InputError names the bad one."""
    from ..errors import InputError

    p = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if k in DEFAULT_PARAMS}}

    def number(name):
        try:
            return float("nan") if isinstance(p[name], bool) else float(p[name])
        except (TypeError, ValueError):
            return float("nan")

    for name in ("alpha", "beta", "gamma"):
        value = number(name)
        if not 0.0 <= value < float("inf"):
            raise InputError(f"{name} must be a finite number >= 0 (0 switches its cost term off), got {p[name]}")
        p[name] = value
    for name, what in (("sigma", "the spatial Gaussian's width in patches"), ("epsilon", "the entropic regularisation")):
        value = number(name)
        if not 0.0 < value < float("inf"):
            raise InputError(f"{name} ({what}) must be a finite number > 0, got {p[name]}")
        p[name] = value
    it = p["iterations"]
    if isinstance(it, bool) or not isinstance(it, (int, np.integer, float)) or it != int(it) or int(it) < 1:
        raise InputError(f"iterations (Sinkhorn row + column scalings) must be a whole number >= 1, got {it}")
    p["iterations"] = int(it)
    value = number("recover")
    if not 0.0 <= value < 1.0:
        raise InputError(f"recover (the fraction of the budget recovered on a stride) must be in [0, 1), got {p['recover']}")
    p["recover"] = value
    return p


def topv_reference(x: dict, keep: int, params: dict) -> torch.Tensor:
    """[B, min(K, N)] ascending kept indices from the graph inputs `x` (name -> tensor):
    image_features (the sources), target_features, token_positions. Nothing else is read."""
    p = check_params(params)
    return topv_select(x["image_features"], x["target_features"], x["token_positions"], keep, alpha=p["alpha"],
                       beta=p["beta"], gamma=p["gamma"], sigma=p["sigma"], epsilon=p["epsilon"],
                       iterations=p["iterations"], recover=p["recover"])


def topv_onnx(params: dict):
    """(onnxscript function, constants for onnx_graph.build_graph), as methods._dpp_onnx returns.

    Graph inputs once the constants are initializers: image_features [B,N,D] float32 (the sources:
    the visual hidden states entering the pruning layer), keep [] int64 (K, a run-time input),
    target_features [B,N,D] float32 (the same tokens after that layer's post-attention norm),
    token_positions [B,N,2] float32 ((row, col) in patches: `token_positions`). Outputs:
    kept_indices [B,K] int64 ascending, selected_features [B,K,D] (the sources at those indices).
    Constants: alpha, beta, gamma, sigma, epsilon, recover (float32), iterations (int64: the trip
    count of the one Loop, a row and a column scaling per trip)."""
    from . import topv_forms as F

    p = check_params(params)
    constants = {name: ("float32", p[name]) for name in ("alpha", "beta", "gamma", "sigma", "epsilon")}
    constants["iterations"] = ("int64", p["iterations"])
    constants["recover"] = ("float32", p["recover"])
    return F.topv_graph, constants


__all__ = ["DEFAULT_PARAMS", "TIE_TOL", "TOPV_INPUTS", "check_params", "keep_with_recovery", "log_importance",
           "log_kernel_of", "minmax", "recovered_count", "sinkhorn_potentials", "snap_ties", "token_positions",
           "topv_cost", "topv_onnx", "topv_reference", "topv_select", "transport_plan", "validity"]
