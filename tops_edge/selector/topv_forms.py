"""TopV: its ONNX form (selector/topv.py is the torch reference, op for op).

Standard ops only. The cost matrix, its min-max normalisations and the ranking are straight-line;
the Sinkhorn scalings are one `Loop` whose trip count is the `iterations` initializer (a row and a
column scaling per trip, f [B,N,1] and g [B,1,N] carried); the budget K is a run-time input: TopK
takes K - R by importance and a full index sort of the rest gives the R recovered on a stride.
"""

from __future__ import annotations

from onnxscript import BOOL, FLOAT, INT64, script
from onnxscript import opset18 as op

from .dpp import INVALID
from .onnx_forms import _budget, _row_inverse_norms, _sorted_and_gathered
from .topv import NORM_TOL, TIE_TOL


@script()
def _topv_minmax(x: FLOAT, mask: BOOL, axes: INT64["A"]):
    """`x` min-max normalised over the entries where `mask` along `axes`, 0 for a flat term (topv.minmax)."""
    inf = op.Constant(value_float=float("inf"))
    lo = op.ReduceMin(op.Where(mask, x, inf), axes, keepdims=1)
    hi = op.ReduceMax(op.Where(mask, x, op.Neg(inf)), axes, keepdims=1)
    spread = op.Sub(hi, lo)
    scale = op.Max(op.Abs(lo), op.Abs(hi))
    varies = op.Greater(spread, op.Mul(op.Constant(value_float=NORM_TOL), scale))
    return op.Where(varies, op.Div(op.Sub(x, lo), spread), op.Constant(value_float=0.0))


@script()
def _topv_lse(x: FLOAT["B", "N", "N"], mask: BOOL["B", "N", "N"], axis: INT64[1]):
    """log sum exp along `axis` of the entries where `mask`, keepdims; -inf where there are none (topv._lse)."""
    x = op.Where(mask, x, op.Constant(value_float=float("-inf")))
    m = op.ReduceMax(x, axis, keepdims=1)
    m = op.Where(op.IsInf(m), op.Constant(value_float=0.0), m)
    return op.Add(op.Log(op.ReduceSum(op.Exp(op.Sub(x, m)), axis, keepdims=1)), m)


@script()
def _topv_validity(sources: FLOAT["B", "N", "D"], targets: FLOAT["B", "N", "D"], positions: FLOAT["B", "N", 2]):
    """(sources, targets with degenerate rows zeroed, positions zeroed where non-finite, validity [B,N]) (topv.validity)."""
    last = op.Constant(value_ints=[-1])
    zero = op.Constant(value_float=0.0)
    _, valid_s = _row_inverse_norms(sources)  # [B,N,1]
    _, valid_t = _row_inverse_norms(targets)
    bad_p = op.Or(op.IsNaN(positions), op.IsInf(positions))
    finite_p = op.Not(op.Cast(op.ReduceMax(op.Cast(bad_p, to=1), last, keepdims=1), to=9))  # [B,N,1]
    valid3 = op.And(op.And(valid_s, valid_t), finite_p)
    s = op.Where(valid_s, sources, zero)
    t = op.Where(valid_t, targets, zero)
    p = op.Where(finite_p, positions, zero)
    return s, t, p, op.Squeeze(valid3, last)


@script()
def _topv_cost(s: FLOAT["B", "N", "D"], t: FLOAT["B", "N", "D"], p: FLOAT["B", "N", 2], valid: BOOL["B", "N"],
               alpha: FLOAT, beta: FLOAT, gamma: FLOAT, sigma: FLOAT):
    """C [B,N,N] = alpha F + beta S + gamma c_i, each term min-max normalised (topv.topv_cost)."""
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    last = op.Constant(value_ints=[-1])
    pair_axes = op.Constant(value_ints=[1, 2])
    pair = op.And(op.Unsqueeze(valid, two), op.Unsqueeze(valid, one))
    ss = op.ReduceSumSquare(s, last, keepdims=1)  # [B,N,1]
    tt = op.Transpose(op.ReduceSumSquare(t, last, keepdims=1), perm=[0, 2, 1])  # [B,1,N]
    cross = op.MatMul(s, op.Transpose(t, perm=[0, 2, 1]))
    d2 = op.Sub(op.Add(ss, tt), op.Mul(op.Constant(value_float=2.0), cross))
    feature = _topv_minmax(op.Sqrt(op.Relu(d2)), pair, pair_axes)
    dp = op.Sub(op.Unsqueeze(p, two), op.Unsqueeze(p, one))  # [B,N,N,2]
    grid2 = op.ReduceSum(op.Mul(dp, dp), last, keepdims=0)
    width = op.Mul(op.Constant(value_float=2.0), op.Mul(sigma, sigma))
    spatial = _topv_minmax(op.Sub(op.Constant(value_float=1.0), op.Exp(op.Div(op.Neg(grid2), width))), pair, pair_axes)
    inf = op.Constant(value_float=float("inf"))
    v3 = op.Unsqueeze(valid, last)
    lo = op.ReduceMin(op.Where(v3, p, inf), one, keepdims=1)
    hi = op.ReduceMax(op.Where(v3, p, op.Neg(inf)), one, keepdims=1)
    off = op.Sub(p, op.Mul(op.Add(lo, hi), op.Constant(value_float=0.5)))
    centre = _topv_minmax(op.Sqrt(op.ReduceSum(op.Mul(off, off), last, keepdims=0)), valid, one)  # [B,N]
    return op.Add(op.Add(op.Mul(alpha, feature), op.Mul(beta, spatial)), op.Mul(gamma, op.Unsqueeze(centre, two)))


@script()
def _topv_log_importance(cost: FLOAT["B", "N", "N"], valid: BOOL["B", "N"], epsilon: FLOAT, iterations: INT64):
    """[B,N] log sum_j P_ij after `iterations` row + column scalings, INVALID at degenerate tokens
    (topv.log_importance, topv.sinkhorn_potentials)."""
    zero_i = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    zero = op.Constant(value_float=0.0)
    rows = op.Unsqueeze(valid, two)  # [B,N,1]
    cols = op.Unsqueeze(valid, one)  # [B,1,N]
    pair = op.And(rows, cols)
    low = op.ReduceMin(op.Where(pair, cost, op.Constant(value_float=float("inf"))), two, keepdims=1)
    low = op.Where(rows, low, zero)
    log_kernel = op.Div(op.Neg(op.Sub(cost, low)), epsilon)  # topv.log_kernel_of
    count = op.ReduceSum(op.Cast(rows, to=1), one, keepdims=1)  # [B,1,1]
    log_mu = op.Neg(op.Log(op.Max(count, op.Constant(value_float=1.0))))
    shape = op.Shape(cost)
    bsz = op.Slice(shape, zero_i, one)
    n = op.Slice(shape, one, two)
    f = op.ConstantOfShape(op.Concat(bsz, n, one, axis=0))
    g = op.ConstantOfShape(op.Concat(bsz, one, n, axis=0))
    for _ in range(iterations):
        f = op.Where(rows, op.Sub(log_mu, _topv_lse(op.Add(log_kernel, g), pair, two)), zero)
        g = op.Where(cols, op.Sub(log_mu, _topv_lse(op.Add(log_kernel, f), pair, one)), zero)
    score = op.Squeeze(op.Add(f, _topv_lse(op.Add(log_kernel, g), pair, two)), two)
    return op.Where(valid, score, op.Constant(value_float=INVALID))


@script()
def _topv_keep(score: FLOAT["B", "N"], valid: BOOL["B", "N"], k: INT64, recover: FLOAT):
    """[B,K] (unsorted): the K - R best scores, then R of the rest on a uniform stride over their
    index order, valid ones first (topv.keep_with_recovery, topv.recovered_count)."""
    zero_i = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    one_s = op.Constant(value_int=1)
    two_s = op.Constant(value_int=2)
    r = op.Cast(op.Floor(op.Mul(recover, op.Cast(k, to=1))), to=7)
    r = op.Max(op.Min(r, op.Sub(k, one_s)), op.Constant(value_int=0))
    near = op.LessOrEqual(op.Unsqueeze(score, one), op.Unsqueeze(op.Add(score, op.Constant(value_float=TIE_TOL)), two))
    snapped = op.ReduceMax(op.Where(near, op.Unsqueeze(score, one), op.Constant(value_float=float("-inf"))), two,
                           keepdims=0)  # topv.snap_ties
    _, top = op.TopK(snapped, op.Reshape(op.Sub(k, r), one), axis=1, largest=1, sorted=1)
    shape = op.Shape(score)
    n = op.Squeeze(op.Slice(shape, one, two))
    in_top = op.Cast(op.ScatterElements(op.ConstantOfShape(shape), top, op.CastLike(op.Expand(one_s, op.Shape(top)), score),
                                        axis=1), to=9)
    index = op.Unsqueeze(op.Range(op.Constant(value_int=0), n, one_s), zero_i)  # [1,N]
    key = op.Where(in_top, op.Add(op.Mul(two_s, n), index), op.Where(valid, index, op.Add(n, index)))
    _, rest = op.TopK(op.Cast(key, to=11), op.Reshape(n, one), axis=1, largest=0, sorted=1)
    left = op.Cast(op.ReduceSum(op.Cast(op.And(valid, op.Not(in_top)), to=1), one, keepdims=1), to=7)  # [B,1]
    width = op.Max(left, r)
    step = op.Unsqueeze(op.Range(op.Constant(value_int=0), r, one_s), zero_i)  # [1,R]
    at = op.Div(op.Mul(op.Add(op.Mul(two_s, step), one_s), width), op.Max(op.Mul(two_s, r), one_s))
    recovered = op.GatherElements(rest, at, axis=1)
    return op.Concat(top, recovered, axis=1)


@script()
def topv_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, target_features: FLOAT["B", "N", "D"],
               token_positions: FLOAT["B", "N", 2], alpha: FLOAT, beta: FLOAT, gamma: FLOAT, sigma: FLOAT,
               epsilon: FLOAT, iterations: INT64, recover: FLOAT):
    s, t, p, valid = _topv_validity(image_features, target_features, token_positions)
    cost = _topv_cost(s, t, p, valid, alpha, beta, gamma, sigma)
    score = _topv_log_importance(cost, valid, epsilon, iterations)
    order = _topv_keep(score, valid, _budget(image_features, keep), recover)
    kept_indices, selected_features = _sorted_and_gathered(order, image_features)
    return kept_indices, selected_features
