"""TOPS as published: its ONNX forms (selector/tops_paper.py is the torch reference, op for op).

Per-token vectors are [B,1,N] as in the DPP loops; the loop state is the penalty (0: candidate,
INVALID: degenerate, -inf: kept) and m, the best similarity of each token to the kept set. Two graphs
per stage (min-max or mean normalisation) keep the loop free of an If per step. Standard ops only;
one `Loop` whose trip count follows the run-time K.
"""

from __future__ import annotations

from onnxscript import BOOL, FLOAT, INT64, script
from onnxscript import opset18 as op

from .dpp import INVALID
from .onnx_forms import _argmax_first, _budget, _gathered, _row_inverse_norms, _taken, _unit_rows
from .tops_paper import NORM_TOL, RATER_TOL, SIM_TOL

@script()
def _tops_paper_minmax(x: FLOAT["B", 1, "N"], cand: BOOL["B", 1, "N"]):
    """(x - min) / (max - min) over the candidates, 0 for a flat term (tops_paper.normalise)."""
    two = op.Constant(value_ints=[2])
    inf = op.Constant(value_float=float("inf"))
    lo = op.ReduceMin(op.Where(cand, x, inf), two, keepdims=1)
    hi = op.ReduceMax(op.Where(cand, x, op.Neg(inf)), two, keepdims=1)
    spread = op.Sub(hi, lo)
    scale = op.Max(op.Abs(lo), op.Abs(hi))
    flat = op.Greater(spread, op.Mul(op.Constant(value_float=NORM_TOL), scale))
    return op.Where(flat, op.Div(op.Sub(x, lo), spread), op.Constant(value_float=0.0))


@script()
def _tops_paper_mean(x: FLOAT["B", 1, "N"], cand: BOOL["B", 1, "N"]):
    """x / mean over the candidates, 0 for a (near) zero mean (tops_paper.normalise)."""
    two = op.Constant(value_ints=[2])
    zero = op.Constant(value_float=0.0)
    count = op.ReduceSum(op.Cast(cand, to=1), two, keepdims=1)
    mean = op.Div(op.ReduceSum(op.Where(cand, x, zero), two, keepdims=1), op.Max(count, op.Constant(value_float=1.0)))
    big = op.ReduceMax(op.Where(cand, op.Abs(x), zero), two, keepdims=1)
    nonzero = op.Greater(op.Abs(mean), op.Mul(op.Constant(value_float=NORM_TOL), big))
    return op.Where(nonzero, op.Div(x, mean), zero)


@script()
def _tops_paper_terms(sim: FLOAT["B", "N", "N"], m: FLOAT["B", 1, "N"], cand: BOOL["B", 1, "N"]):
    """(coverage c, diversity d) [B,1,N] (tops_paper.step_terms): c is a masked row sum, O(N^2)."""
    tol = op.Constant(value_float=SIM_TOL)
    d = op.Relu(op.Sub(op.Sub(op.Constant(value_float=1.0), m), tol))
    gain = op.Relu(op.Sub(op.Sub(sim, m), tol))
    c = op.ReduceSum(op.Where(cand, gain, op.Constant(value_float=0.0)), op.Constant(value_ints=[2]), keepdims=1)
    return op.Reshape(c, op.Shape(m)), d


@script()
def _tops_paper_prepare(features: FLOAT["B", "N", "D"], relevance: FLOAT["B", "N"]):
    """(sim [B,N,N], r [B,1,N] zero at degenerate tokens, validity [B,1,N]) (tops_paper.prepare)."""
    one = op.Constant(value_ints=[1])
    unit, _, valid_f = _unit_rows(features)
    valid = op.And(valid_f, op.Not(op.Or(op.IsNaN(relevance), op.IsInf(relevance))))
    r = op.Where(valid, relevance, op.Constant(value_float=0.0))
    sim = op.MatMul(unit, op.Transpose(unit, perm=[0, 2, 1]))
    return sim, op.Unsqueeze(r, one), op.Unsqueeze(valid, one)


@script()
def _tops_paper_seed(sim: FLOAT["B", "N", "N"], r: FLOAT["B", 1, "N"], valid: BOOL["B", 1, "N"]):
    """Loop-invariant helpers and the state after the seed S = {argmax r}: penalty, m [B,1,N]."""
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    bsz = op.Slice(op.Shape(sim), zero, one)
    n = op.Slice(op.Shape(sim), one, two)
    offsets = op.Mul(op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(bsz), op.Constant(value_int=1)), one),
                     op.Squeeze(n))  # [B,1]: row b of the [B*N, N] flattening starts at b*N
    flat = op.Reshape(sim, op.Concat(op.Constant(value_ints=[-1]), n, axis=0))
    taken = op.Expand(op.Constant(value_float=float("-inf")), op.Concat(bsz, one, one, axis=0))
    penalty = op.Where(valid, op.Constant(value_float=0.0), op.Constant(value_float=INVALID))
    j = _argmax_first(op.Where(valid, _tops_paper_minmax(r, valid), penalty))
    penalty = op.ScatterElements(penalty, j, taken, axis=2)
    m = op.Gather(flat, op.Add(op.Squeeze(j, two), offsets), axis=0)  # sim[j, :]  [B,1,N]
    return penalty, m, flat, offsets, taken


@script()
def _tops_paper_greedy_minmax(sim: FLOAT["B", "N", "N"], r: FLOAT["B", 1, "N"], valid: BOOL["B", 1, "N"],
                              budget: INT64, alpha: FLOAT, lam: FLOAT, relevance: FLOAT):
    """The TOPS greedy with min-max normalisation: the kept set [B, K], ascending."""
    two = op.Constant(value_ints=[2])
    penalty, m, flat, offsets, taken = _tops_paper_seed(sim, r, valid)
    rest = op.Sub(budget, op.Constant(value_int=1))
    for _ in range(rest):
        cand = op.Equal(penalty, op.Constant(value_float=0.0))
        c, d = _tops_paper_terms(sim, m, cand)
        score = op.Add(op.Add(op.Mul(relevance, _tops_paper_minmax(r, cand)), op.Mul(lam, _tops_paper_minmax(c, cand))),
                       op.Mul(alpha, _tops_paper_minmax(d, cand)))
        j = _argmax_first(op.Where(cand, score, penalty))
        penalty = op.ScatterElements(penalty, j, taken, axis=2)
        m = op.Max(m, op.Gather(flat, op.Add(op.Squeeze(j, two), offsets), axis=0))
    return _taken(penalty, budget)


@script()
def _tops_paper_greedy_mean(sim: FLOAT["B", "N", "N"], r: FLOAT["B", 1, "N"], valid: BOOL["B", 1, "N"],
                            budget: INT64, alpha: FLOAT, lam: FLOAT, relevance: FLOAT):
    """The TOPS greedy with mean normalisation: the kept set [B, K], ascending."""
    two = op.Constant(value_ints=[2])
    penalty, m, flat, offsets, taken = _tops_paper_seed(sim, r, valid)
    rest = op.Sub(budget, op.Constant(value_int=1))
    for _ in range(rest):
        cand = op.Equal(penalty, op.Constant(value_float=0.0))
        c, d = _tops_paper_terms(sim, m, cand)
        score = op.Add(op.Add(op.Mul(relevance, _tops_paper_mean(r, cand)), op.Mul(lam, _tops_paper_mean(c, cand))),
                       op.Mul(alpha, _tops_paper_mean(d, cand)))
        j = _argmax_first(op.Where(cand, score, penalty))
        penalty = op.ScatterElements(penalty, j, taken, axis=2)
        m = op.Max(m, op.Gather(flat, op.Add(op.Squeeze(j, two), offsets), axis=0))
    return _taken(penalty, budget)


@script()
def _text_rater_relevance(image_features: FLOAT["B", "N", "D"], text_features: FLOAT["B", "Q", "D"],
                          text_attention: FLOAT["B", "Q", "N"], rater_sqrt_d: FLOAT):
    """r [B,N]: the dynamic text raters' mean attention to each visual token, NaN where no rater has
    a finite entry, 0 without any valid prompt token (tops_paper.text_raters, text_rater_relevance)."""
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    zero = op.Constant(value_float=0.0)
    unit = op.Constant(value_float=1.0)
    _, valid_v = _row_inverse_norms(image_features)  # [B,N,1]
    _, valid_t = _row_inverse_norms(text_features)  # [B,Q,1]
    h = op.Where(valid_v, image_features, zero)
    t = op.Where(valid_t, text_features, zero)
    logits = op.MatMul(h, op.Transpose(t, perm=[0, 2, 1]))  # [B,N,Q]
    width = op.Cast(op.Slice(op.Shape(image_features), two, op.Constant(value_ints=[3])), to=1)
    scale = op.Where(op.Greater(rater_sqrt_d, zero), op.Div(unit, op.Sqrt(width)), unit)
    logits = op.Mul(logits, scale)
    vt = op.Transpose(valid_t, perm=[0, 2, 1])  # [B,1,Q]
    top = op.ReduceMax(op.Where(vt, logits, op.Constant(value_float=float("-inf"))), two, keepdims=1)
    e = op.Where(vt, op.Exp(op.Sub(logits, top)), zero)
    p = op.Div(e, op.Max(op.ReduceSum(e, two, keepdims=1), unit))
    rel = op.Div(op.ReduceSum(op.Where(valid_v, p, zero), one, keepdims=1),
                 op.Max(op.ReduceSum(op.Cast(valid_v, to=1), one, keepdims=1), unit))  # [B,1,Q]
    count = op.ReduceSum(op.Cast(vt, to=1), two, keepdims=1)
    mean = op.Div(op.ReduceSum(op.Where(vt, rel, zero), two, keepdims=1), op.Max(count, unit))
    raters = op.And(vt, op.Greater(rel, op.Mul(mean, op.Constant(value_float=1.0 + RATER_TOL))))
    some = op.Greater(op.ReduceSum(op.Cast(raters, to=1), two, keepdims=1), zero)
    raters = op.Or(raters, op.And(op.Not(some), vt))  # raters are valid: none -> every valid prompt token
    use = op.And(op.Transpose(raters, perm=[0, 2, 1]), op.Not(op.Or(op.IsNaN(text_attention), op.IsInf(text_attention))))
    used = op.ReduceSum(op.Cast(use, to=1), one, keepdims=0)  # [B,N]
    total = op.ReduceSum(op.Where(use, text_attention, zero), one, keepdims=0)
    anyone = op.Squeeze(op.Greater(op.ReduceSum(op.Cast(raters, to=1), two, keepdims=1), zero), one)  # [B,1]
    missing = op.Where(anyone, op.Constant(value_float=float("nan")), zero)  # no prompt token at all: r = 0
    return op.Where(op.Greater(used, zero), op.Div(total, op.Max(used, unit)), missing)


# Stage I (before the LLM): r = the vision tower's [CLS] attention. Stage II (at a decoder cut): r =
# the text raters' attention, from the prompt's hidden states text_features [B,Q,D] at the cut.
@script()
def tops_paper_vision_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, cls_attention: FLOAT["B", "N"],
                            alpha: FLOAT, lam: FLOAT, relevance: FLOAT):
    sim, r, valid = _tops_paper_prepare(image_features, cls_attention)
    kept_indices = _tops_paper_greedy_minmax(sim, r, valid, _budget(image_features, keep), alpha, lam, relevance)
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def tops_paper_vision_mean_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, cls_attention: FLOAT["B", "N"],
                                 alpha: FLOAT, lam: FLOAT, relevance: FLOAT):
    sim, r, valid = _tops_paper_prepare(image_features, cls_attention)
    kept_indices = _tops_paper_greedy_mean(sim, r, valid, _budget(image_features, keep), alpha, lam, relevance)
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def tops_paper_cut_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, text_attention: FLOAT["B", "Q", "N"],
                         text_features: FLOAT["B", "Q", "D"], alpha: FLOAT, lam: FLOAT, relevance: FLOAT,
                         rater_sqrt_d: FLOAT):
    rel = _text_rater_relevance(image_features, text_features, text_attention, rater_sqrt_d)
    sim, r, valid = _tops_paper_prepare(image_features, rel)
    kept_indices = _tops_paper_greedy_minmax(sim, r, valid, _budget(image_features, keep), alpha, lam, relevance)
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def tops_paper_cut_mean_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, text_attention: FLOAT["B", "Q", "N"],
                              text_features: FLOAT["B", "Q", "D"], alpha: FLOAT, lam: FLOAT, relevance: FLOAT,
                              rater_sqrt_d: FLOAT):
    rel = _text_rater_relevance(image_features, text_features, text_attention, rater_sqrt_d)
    sim, r, valid = _tops_paper_prepare(image_features, rel)
    kept_indices = _tops_paper_greedy_mean(sim, r, valid, _budget(image_features, keep), alpha, lam, relevance)
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features
