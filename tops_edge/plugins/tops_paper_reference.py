"""The torch semantics of `tops::PaperSelect`, the paper's TOPS greedy (selector/tops_paper.py) as a plugin.

Standard ops compute the plugin's inputs, as tops_paper.prepare does (tops_paper_forms._tops_paper_prepare):
  similarity [B,N,N] f32  cosine similarity of the unit rows (degenerate rows zero)
  relevance  [B,N]    f32  the stage's relevance, 0 at degenerate tokens
  valid      [B,N]    i32  1 where the feature row is finite and non-zero and the relevance finite
  keep       [1]      i32  the run-time budget K
The plugin runs the greedy (seed, coverage, diversity, normalisation, ties) in one program per image
and outputs the pick order [B,N] i32: the first min(max(K, 1), N) entries are the tokens in the
order picked, the rest -1 (a static shape). Standard ops then slice the first K, sort them ascending
and gather, as for tops::Select (onnx_form.py). A second output [B,N] f32 is the kernel's scratch.

`paper_select_order` is the plugin's JIT `impl` and, composed with `paper_plugin_inputs`, equals
tops_paper.tops_order (tests); the Triton kernel (tops_paper_kernel.py) equals both.
"""

from __future__ import annotations

import torch

from ..selector import dpp, tops_paper


def paper_plugin_inputs(features: torch.Tensor, relevance: torch.Tensor):
    """(similarity, relevance, valid int32) as the exported graph computes them before the plugin node."""
    sim, r, valid = tops_paper.prepare(features, relevance)
    return sim, r, valid.to(torch.int32)


def paper_select_order(similarity, relevance, valid, keep: int, *, alpha: float, lam: float,
                       relevance_weight: float = 1.0, norm: str = "minmax") -> torch.Tensor:
    """[B,N] int32: the greedy order, first min(max(keep, 1), N) entries filled, the rest -1
    (tops_paper.tops_order's loop, on its prepared inputs)."""
    if norm not in tops_paper.NORMS:
        raise ValueError(f"norm must be one of {', '.join(tops_paper.NORMS)}, got {norm!r}")
    sim, r, ok = similarity.float(), relevance.float(), valid != 0
    b, n = r.shape
    steps = max(1, min(int(keep), n))
    rows = torch.arange(b, device=r.device)
    penalty = torch.where(ok, torch.zeros_like(r), torch.full_like(r, dpp.INVALID))
    j = dpp.argmax_first(torch.where(ok, tops_paper.normalise(r, ok, "minmax"), penalty))
    penalty[rows, j] = float("-inf")
    m = sim[rows, j]
    picks = [j]
    for _ in range(steps - 1):
        cand = penalty == 0
        score = tops_paper.step_scores(sim, m, cand, r, alpha=alpha, lam=lam, norm=norm,
                                       relevance_weight=relevance_weight)
        j = dpp.argmax_first(torch.where(cand, score, penalty))
        penalty[rows, j] = float("-inf")
        m = torch.maximum(m, sim[rows, j])
        picks.append(j)
    order = torch.full((b, n), -1, dtype=torch.int32, device=r.device)
    order[:, :steps] = torch.stack(picks, 1).to(torch.int32)
    return order
