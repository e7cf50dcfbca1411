"""The torch semantics of `tops::Select`: the split between the graph's standard ops and the plugin.

Standard ops (cheap, or GEMMs TensorRT runs well) compute the plugin's inputs:
  similarity [B,N,N] f32  S = f f^T on the unit similarity rows (degenerate rows zero)
  cosine     [B,N]    f32  cos(v_i, q_bar) of the projected tokens and the mean instruction
  valid      [B,N]    i32  1 where both the token and its similarity row are finite and non-zero
  keep       [1]      i32  the run-time budget K
The plugin does the rest of dpp.dpp_select, in one program per image: relevance (sign, min-max,
w = exp(alpha r)), L = diag(w) S diag(w) row by row, and the greedy. It outputs the greedy order
[B,N] i32: the first min(K, N) entries are the tokens in the order chosen, the rest -1; its shape
does not depend on K, so TensorRT sees a static output. Standard ops then slice the first K, sort
them ascending and gather the kept tokens.

`select_order` is the JIT `impl` of the plugin and the reference the Triton kernel is tested against;
composed with `plugin_inputs` it equals dpp.dpp_select exactly (tests).
"""

from __future__ import annotations

import torch

from ..selector.dpp import (greedy, instruction_cosine, minmax_relevance, similarity_features, similarity_matrix,
                             weighted_kernel)


def plugin_inputs(image_features, instruction_embeds, instruction_mask, vision_features=None, *, spatial: float = 0.0,
                  grid=None, keep: int | None = None):
    """(similarity, cosine, valid) as the exported graph computes them before the plugin node (the
    spatial factor, when `spatial` > 0, needs the budget `keep` and the token `grid`)."""
    f, valid = similarity_features(image_features, vision_features)
    similarity = similarity_matrix(f, keep, spatial, grid)
    cosine = instruction_cosine(image_features, instruction_embeds, instruction_mask)
    return similarity, cosine, valid.to(torch.int32)


def relevance_weights(cosine, valid, alpha: float, sign: float) -> torch.Tensor:
    """w = exp(alpha * min-max(sign * cos)) on valid tokens, 0 elsewhere."""
    r = minmax_relevance(sign * cosine, valid)
    return torch.where(valid, torch.exp(alpha * r), torch.zeros_like(r))


def select_order(similarity, cosine, valid, keep: int, *, alpha: float, beta: float, sign: float) -> torch.Tensor:
    """[B,N] int32: the greedy order, first min(keep, N) entries filled, the rest -1."""
    ok = valid != 0
    b, n = cosine.shape
    steps = max(0, min(int(keep), n))
    order = torch.full((b, n), -1, dtype=torch.int32, device=cosine.device)
    if steps:
        kernel = weighted_kernel(similarity.float(), relevance_weights(cosine.float(), ok, alpha, sign))
        order[:, :steps] = greedy(kernel, ok, steps, beta).to(torch.int32)
    return order


def kept_from_order(order: torch.Tensor, keep: int) -> torch.Tensor:
    """[B,K] ascending indices: what the graph's Slice + TopK(ascending) make of the plugin's order."""
    return order[:, : min(int(keep), order.shape[1])].long().sort(1).values
