"""dpp-merge (our DPP variant) and CDPruner (torch reference): relevance-weighted DPP kernels and their greedy selection.

Formulation (our DPP variant, registered as dpp-merge; TOPS.md section 4):
  r  = min-max( sign * cos(v_i, q_bar) )            task relevance, q_bar = mean normalised instruction
  w  = exp(alpha * r)                                alpha = 0 switches relevance off
  L  = diag(w) S diag(w),  S_ij = cos(f_i, f_j) G_ij  conditional kernel (f: the similarity features)
  G_ij = exp(-|p_i - p_j|^2 / (2 sigma^2)),  sigma = spatial * sqrt(N / K)   spatial coverage (p: grid
       position; sigma is `spatial` times the spacing of K evenly spread tokens; spatial = 0: G = 1)
  greedy on the residual R = L - C C^T (C: Cholesky columns of the tokens kept so far):
  j  = argmax_i (1 - beta) log d_i + beta log c_i    d_i = R_ii, c_i = sum_k R_ki^2
     = argmax_i log d_i + beta log(c_i / d_i)        DPP MAP gain + coverage (greedy Nystrom)
  beta = 0 is conditional-DPP greedy MAP (CDPruner).

R is never materialised: its row j is L_j - C_j^T C (O(N k)), and the coverage update needs R e =
L e - C^T (C e), one N^2 matrix-vector product a step. That is what keeps the ONNX loop cheap.

Determinism across backends: a token whose residual d_i is at most EXHAUSTED_REL * L_ii carries no
new information and scores EXHAUSTED, so once every token is exhausted the lowest index wins. A
degenerate token (non-finite or zero features) scores below that and is never chosen over a finite
one. Scores within TIE_TOL of the best are ties, won by the lowest index: duplicate tokens tie
exactly in exact arithmetic, but two GEMMs (batched or not, torch or ORT) round them differently in
the last bit. Everything is fp32, whatever the model's dtype.
"""

from __future__ import annotations

import torch

EXHAUSTED_REL = 1e-3
EXHAUSTED = -1e30  # score of a token with no residual information left
INVALID = -1e30  # added to the score of a degenerate token (so it scores 2 * EXHAUSTED)
MINMAX_EPS = 1e-6
TIE_TOL = 1e-5  # on log-gains and cosine distances: far above fp32 rounding, far below real gaps


def argmax_first(score: torch.Tensor) -> torch.Tensor:
    """[B] index of the lowest-index score within TIE_TOL of the row's maximum."""
    best = score.amax(1, keepdim=True)
    return (score >= best - TIE_TOL).to(torch.int8).argmax(1)


def row_norms(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows with degenerate ones zeroed, 1/|row| (0 for degenerate), validity) in fp32.

    One sum of squares decides validity: a NaN or inf anywhere in a row (or an overflowing row) makes
    it non-finite, a zero row makes it 0; both rows are degenerate.
    """
    x = features.float()
    sq = (x * x).sum(-1, keepdim=True)
    valid = torch.isfinite(sq) & (sq > 0)
    inv = torch.where(valid, 1.0 / sq.sqrt(), torch.zeros_like(sq))
    return torch.where(valid, x, torch.zeros_like(x)), inv, valid.squeeze(-1)


def sanitize(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 unit-norm rows and a validity mask; degenerate rows become zeros."""
    x, inv, valid = row_norms(features)
    return x * inv, valid


def instruction_cosine(tokens: torch.Tensor, instruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B,N] cos(v_i, q_bar), q_bar = mean of the normalised instruction rows where `mask` is 1.

    `tokens` are raw rows (a degenerate row gives a meaningless entry: callers mask it). CDPruner
    averages cos(v_i, t_m) over m: that is v_i . q_bar up to a positive scale, which the min-max
    normalisation in `relevance` removes, so both readings give the same r.
    """
    _, inv, _ = row_norms(tokens)
    q, q_valid = sanitize(instruction)
    m = (mask.to(torch.float32) * q_valid.to(torch.float32)).unsqueeze(-1)
    q_bar = (q * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B, D]
    return torch.einsum("bnd,bd->bn", tokens.float(), q_bar) * inv.squeeze(-1)


def relevance(tokens: torch.Tensor, valid: torch.Tensor, instruction: torch.Tensor, mask: torch.Tensor,
              sign: float) -> torch.Tensor:
    """[B,N] in [0,1]: sign * cos(v_i, q_bar), min-max normalised over the valid tokens."""
    return minmax_relevance(sign * instruction_cosine(tokens, instruction, mask), valid)


def minmax_relevance(raw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`raw` min-max normalised to [0,1] over the valid tokens; 0 elsewhere."""
    lo = torch.where(valid, raw, torch.full_like(raw, float("inf"))).amin(1, keepdim=True)
    hi = torch.where(valid, raw, torch.full_like(raw, float("-inf"))).amax(1, keepdim=True)
    r = (raw - lo) / (hi - lo + MINMAX_EPS)
    return torch.where(valid, r, torch.zeros_like(r))


def conditional_kernel(sim_tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = diag(w) S diag(w) with S the cosine similarity of the (unit) rows of `sim_tokens`."""
    return weighted_kernel(sim_tokens @ sim_tokens.transpose(1, 2), weights)


def weighted_kernel(similarity: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = diag(w) S diag(w)."""
    return weights.unsqueeze(2) * similarity * weights.unsqueeze(1)


def greedy(kernel: torch.Tensor, valid: torch.Tensor, keep: int, beta: float = 0.0) -> torch.Tensor:
    """Greedy selection on `kernel` [B,N,N]; returns [B, keep] indices in the order chosen."""
    b, n, _ = kernel.shape
    d = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    floor = EXHAUSTED_REL * d
    c = (kernel * kernel).sum(1)
    penalty = torch.where(valid, torch.zeros_like(d), torch.full_like(d, INVALID))
    cols = kernel.new_zeros(b, 0, n)
    rows = torch.arange(b)
    order = []
    for _ in range(keep):
        # c_i = sum_k R_ki^2 >= R_ii^2 = d_i^2 exactly; the running update can round c below that (even
        # below 0 once a low-rank kernel is nearly exhausted), and a NaN score would win every argmax
        gain = torch.log(d) if beta == 0 else (1.0 - beta) * torch.log(d) + beta * torch.log(torch.maximum(c, d * d))
        score = torch.where(d > floor, gain, torch.full_like(d, EXHAUSTED)) + penalty
        j = argmax_first(score)
        dj = d[rows, j]
        resid = kernel[rows, j] - torch.einsum("bk,bkn->bn", cols[rows, :, j], cols)
        e = torch.where((dj > floor[rows, j]).unsqueeze(1), resid / dj.sqrt().unsqueeze(1), torch.zeros_like(d))
        if beta != 0:
            re = torch.einsum("bn,bnm->bm", e, kernel) - torch.einsum("bk,bkn->bn", torch.einsum("bn,bkn->bk", e, cols), cols)
            c = c - e * (2.0 * re - (e * e).sum(1, keepdim=True) * e)  # |R_i - e e_i|^2, expanded
        d = d - e * e
        penalty[rows, j] = float("-inf")
        cols = torch.cat([cols, e.unsqueeze(1)], 1)
        order.append(j)
    return torch.stack(order, 1)


def similarity_features(image_features, vision_features=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit rows similarity is measured on, validity): the vision features when given, else the
    projected tokens; a token is valid only if both its rows are finite and non-zero."""
    v, valid = sanitize(image_features)
    if vision_features is None:
        return v, valid
    f, valid_f = sanitize(vision_features)
    return f, valid & valid_f


def spatial_factor(num_tokens: int, grid: tuple[int, int], keep: int, spatial: float) -> torch.Tensor:
    """G [N,N] = exp(-|p_i - p_j|^2 * K / (2 spatial^2 N)) over the tokens' (row, col) on `grid`
    (row-major; a 1 x N grid is a sequence). A Gaussian kernel is PSD, so S * G stays PSD (Schur
    product). Without it, S is low-rank on real images (a plain background is one direction), and
    once its rank is spent the greedy has no reason to prefer any of the remaining tokens."""
    k = torch.tensor(min(keep, num_tokens), dtype=torch.float32)
    scale = k / (2.0 * torch.tensor(spatial, dtype=torch.float32) ** 2 * num_tokens)
    idx = torch.arange(num_tokens)
    row, col = (idx // grid[1]).float(), (idx % grid[1]).float()
    d2 = (row[:, None] - row[None, :]) ** 2 + (col[:, None] - col[None, :]) ** 2
    return torch.exp(-(d2 * scale))


def similarity_matrix(unit_rows: torch.Tensor, keep: int, spatial: float = 0.0, grid=None) -> torch.Tensor:
    """[B,N,N] S = f f^T of unit rows, times the spatial factor on `grid` (default 1 x N) when
    `spatial` > 0."""
    similarity = unit_rows @ unit_rows.transpose(1, 2)
    if spatial:
        n = unit_rows.shape[1]
        similarity = similarity * spatial_factor(n, grid or (1, n), keep, spatial)
    return similarity


def dpp_select(image_features, instruction_embeds, instruction_mask, keep: int, *, alpha: float, beta: float,
               sign: float, vision_features=None, spatial: float = 0.0, grid: tuple[int, int] | None = None
               ) -> torch.Tensor:
    """dpp-merge (beta > 0) or CDPruner (beta = 0): [B, keep] ascending indices. `spatial` > 0 multiplies
    the similarity by a Gaussian of the tokens' distance on `grid` (default 1 x N)."""
    f, valid = similarity_features(image_features, vision_features)
    r = relevance(image_features, valid, instruction_embeds, instruction_mask, sign)
    w = torch.where(valid, torch.exp(alpha * r), torch.zeros_like(r))
    order = greedy(weighted_kernel(similarity_matrix(f, keep, spatial, grid), w), valid, min(keep, f.shape[1]), beta)
    return order.sort(1).values
