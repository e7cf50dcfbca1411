"""The selectors' ONNX forms, written with onnxscript: standard ops only, so ONNX Runtime (or any
runtime) runs them; greedy methods are one ONNX `Loop` whose trip count is the run-time budget K.

Each form mirrors its torch reference op for op (tests check they pick the same indices). Export-time
parameters (alpha, beta, sign, seed, grid) are graph inputs here and are frozen into initializers by
`onnx_graph.build_graph`, so the exported graph's inputs are only the tensors the runtime feeds.

Common IO: image_features [B,N,D] float, keep [] int64 -> kept_indices [B,K] int64 ascending,
selected_features [B,K,D]. The in-LLM forms (stage "llm") also take text_attention [B,Q,N] float.
"""

from __future__ import annotations

from onnxscript import BOOL, DOUBLE, FLOAT, INT64, script
from onnxscript import opset18 as op

from .dpp import EXHAUSTED, EXHAUSTED_REL, INVALID, MINMAX_EPS, TIE_TOL
from .scored import LEHMER_MODULUS, LEHMER_MULTIPLIER

@script()
def _row_inverse_norms(x: FLOAT["B", "N", "D"]):
    """(1/|row| [B,N,1] with 0 for degenerate rows, validity [B,N,1]); one pass (see dpp.row_norms)."""
    sq = op.ReduceSumSquare(x, op.Constant(value_ints=[-1]), keepdims=1)
    valid3 = op.And(op.Not(op.Or(op.IsNaN(sq), op.IsInf(sq))), op.Greater(sq, op.Constant(value_float=0.0)))
    inv = op.Where(valid3, op.Div(op.Constant(value_float=1.0), op.Sqrt(sq)), op.Constant(value_float=0.0))
    return inv, valid3


@script()
def _unit_rows(x: FLOAT["B", "N", "D"]):
    """Unit-norm fp32 rows, 1/|row| [B,N,1] and validity [B,N]; degenerate rows become zeros (see dpp.sanitize)."""
    inv, valid3 = _row_inverse_norms(x)
    unit = op.Where(valid3, op.Mul(x, inv), op.Constant(value_float=0.0))
    return unit, inv, op.Squeeze(valid3, op.Constant(value_ints=[-1]))


@script()
def _instruction_cosine(tokens: FLOAT["B", "N", "D"], inv: FLOAT["B", "N", 1], instruction: FLOAT["B", "M", "D"],
                        mask: INT64["B", "M"]):
    """cos(v_i, q_bar) [B,N] (see dpp.instruction_cosine), on the raw rows times 1/|row|: one pass
    over the wide tokens; a degenerate row only spoils its own entry, which callers mask."""
    one = op.Constant(value_ints=[1])
    last = op.Constant(value_ints=[-1])
    q, _, q_valid = _unit_rows(instruction)
    m = op.Unsqueeze(op.Mul(op.Cast(mask, to=1), op.Cast(q_valid, to=1)), last)
    q_bar = op.Div(op.ReduceSum(op.Mul(q, m), one, keepdims=0), op.Max(op.ReduceSum(m, one, keepdims=0), op.Constant(value_float=1.0)))
    return op.Squeeze(op.Mul(op.MatMul(tokens, op.Unsqueeze(q_bar, last)), inv), last)


@script()
def _relevance(tokens: FLOAT["B", "N", "D"], inv: FLOAT["B", "N", 1], valid: BOOL["B", "N"],
               instruction: FLOAT["B", "M", "D"], mask: INT64["B", "M"], sign: FLOAT):
    """sign * cos(v_i, q_bar), min-max normalised over valid tokens (see dpp.relevance)."""
    one = op.Constant(value_ints=[1])
    raw = op.Mul(sign, _instruction_cosine(tokens, inv, instruction, mask))
    inf = op.Constant(value_float=float("inf"))
    lo = op.ReduceMin(op.Where(valid, raw, inf), one, keepdims=1)
    hi = op.ReduceMax(op.Where(valid, raw, op.Neg(inf)), one, keepdims=1)
    r = op.Div(op.Sub(raw, lo), op.Add(op.Sub(hi, lo), op.Constant(value_float=MINMAX_EPS)))
    return op.Where(valid, r, op.Constant(value_float=0.0))


@script()
def _argmax_first(score: FLOAT["B", "N"]):
    """Lowest index within TIE_TOL of the best along the last axis, keepdims (see dpp.argmax_first)."""
    best = op.ReduceMax(score, op.Constant(value_ints=[-1]), keepdims=1)
    near = op.GreaterOrEqual(score, op.Sub(best, op.Constant(value_float=TIE_TOL)))
    return op.ArgMax(op.Cast(near, to=1), axis=-1, keepdims=1)


@script()
def _gathered(kept: INT64["B", "K"], features: FLOAT["B", "N", "D"]):
    """The tokens at `kept`."""
    d = op.Slice(op.Shape(features), op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
    index = op.Expand(op.Unsqueeze(kept, op.Constant(value_ints=[2])), op.Concat(op.Shape(kept), d, axis=0))
    return op.GatherElements(features, index, axis=1)


@script()
def _sorted_and_gathered(order: INT64["B", "K"], features: FLOAT["B", "N", "D"]):
    """Ascending indices (spatial order) and the tokens they name."""
    k = op.Slice(op.Shape(order), op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    values, _ = op.TopK(op.Cast(order, to=11), k, axis=1, largest=0, sorted=1)
    kept = op.Cast(values, to=7)
    return kept, _gathered(kept, features)


@script()
def _taken(penalty: FLOAT["B", 1, "N"], k: INT64):
    """[B,K] ascending indices of the tokens a greedy loop took (their penalty is -inf)."""
    flat = op.Squeeze(penalty, op.Constant(value_ints=[1]))
    n = op.Slice(op.Shape(flat), op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    index = op.Cast(op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1)), to=1)
    taken = op.IsInf(flat, detect_positive=0)
    rank = op.Where(taken, op.Neg(index), op.Constant(value_float=-1e9))  # lowest index ranks first
    _, kept = op.TopK(rank, op.Reshape(k, op.Constant(value_ints=[1])), axis=1, largest=1, sorted=1)
    return kept


@script()
def _budget(features: FLOAT["B", "N", "D"], keep: INT64) -> INT64:
    """min(K, N) as a 0-d tensor: K >= N keeps every token."""
    n = op.Squeeze(op.Slice(op.Shape(features), op.Constant(value_ints=[1]), op.Constant(value_ints=[2])))
    return op.Min(op.Reshape(keep, op.Constant(value_ints=[])), n)


# The greedy loops keep every per-token vector as [B,1,N] and build all index shapes before the
# loop: the loop's cost on a CPU is its op count, not its arithmetic.
@script()
def _greedy_init(kernel: FLOAT["B", "N", "N"], valid: BOOL["B", "N"]):
    """Loop-invariant helpers and the initial state: d, floor, penalty [B,1,N] and an empty C."""
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    bsz = op.Slice(op.Shape(kernel), zero, one)
    n = op.Slice(op.Shape(kernel), one, two)
    eye = op.EyeLike(op.Squeeze(op.Slice(kernel, zero, one, zero), zero))
    d = op.Unsqueeze(op.ReduceSum(op.Mul(kernel, eye), two, keepdims=0), one)
    floor = op.Mul(op.Constant(value_float=EXHAUSTED_REL), d)
    penalty = op.Unsqueeze(op.Where(valid, op.Constant(value_float=0.0), op.Constant(value_float=INVALID)), one)
    cols = op.CastLike(op.ConstantOfShape(op.Concat(bsz, zero, n, axis=0)), kernel)  # C   [B,k,N]
    cols_t = op.CastLike(op.ConstantOfShape(op.Concat(bsz, n, zero, axis=0)), kernel)  # C^T [B,N,k]
    offsets = op.Mul(op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(bsz), op.Constant(value_int=1)), one),
                     op.Squeeze(n))  # [B,1]: row b of a [B*N, .] flattening starts at b*N
    flat_kernel = op.Reshape(kernel, op.Concat(op.Constant(value_ints=[-1]), n, axis=0))
    column = op.Concat(bsz, n, one, axis=0)  # the shape of e as a column, [B,N,1]
    taken = op.Expand(op.Constant(value_float=float("-inf")), op.Concat(bsz, one, one, axis=0))
    return d, floor, penalty, cols, cols_t, offsets, flat_kernel, column, taken


@script()
def _greedy_pick(flat_kernel: FLOAT["BN", "N"], d: FLOAT["B", 1, "N"], floor: FLOAT["B", 1, "N"],
                 penalty: FLOAT["B", 1, "N"], cols: FLOAT["B", "K", "N"], cols_t: FLOAT["B", "N", "K"],
                 offsets: INT64["B", 1], gain: FLOAT["B", 1, "N"]):
    """The best token j [B,1,1] and its new Cholesky column e [B,1,N] (zero for an exhausted pick)."""
    score = op.Add(op.Where(op.Greater(d, floor), gain, op.Constant(value_float=EXHAUSTED)), penalty)
    j = _argmax_first(score)
    rows = op.Add(op.Squeeze(j, op.Constant(value_ints=[2])), offsets)  # [B,1] into the flattenings
    dj = op.GatherElements(d, j, axis=2)
    row = op.Gather(flat_kernel, rows, axis=0)  # L[j, :]           [B,1,N]
    cj = op.Gather(op.Flatten(cols_t, axis=2), rows, axis=0)  # C[:, j]^T  [B,1,k]
    resid = op.Sub(row, op.MatMul(cj, cols))  # R[j, :] = L[j, :] - C[:, j]^T C
    ok = op.Greater(dj, op.GatherElements(floor, j, axis=2))
    e = op.Where(ok, op.Div(resid, op.Sqrt(dj)), op.Constant(value_float=0.0))
    return j, e


@script()
def _greedy_update(d: FLOAT["B", 1, "N"], penalty: FLOAT["B", 1, "N"], cols: FLOAT["B", "K", "N"],
                   cols_t: FLOAT["B", "N", "K"], j: INT64["B", 1, 1], e: FLOAT["B", 1, "N"],
                   taken: FLOAT["B", 1, 1], column: INT64[3]):
    """After keeping j: shrink the residual diagonal, mark j taken, append e to C (both layouts)."""
    d = op.Sub(d, op.Mul(e, e))
    penalty = op.ScatterElements(penalty, j, taken, axis=2)
    cols = op.Concat(cols, e, axis=1)
    cols_t = op.Concat(cols_t, op.Reshape(e, column), axis=2)
    return d, penalty, cols, cols_t


@script()
def _greedy_map(kernel: FLOAT["B", "N", "N"], valid: BOOL["B", "N"], keep: INT64):
    """Conditional-DPP greedy MAP (beta = 0): the kept set [B, K], ascending."""
    d, floor, penalty, cols, cols_t, offsets, flat_kernel, column, taken = _greedy_init(kernel, valid)
    for _ in range(keep):
        j, e = _greedy_pick(flat_kernel, d, floor, penalty, cols, cols_t, offsets, op.Log(d))
        d, penalty, cols, cols_t = _greedy_update(d, penalty, cols, cols_t, j, e, taken, column)
    return _taken(penalty, keep)


@script()
def _greedy_coverage(kernel: FLOAT["B", "N", "N"], valid: BOOL["B", "N"], keep: INT64, beta: FLOAT):
    """dpp-merge greedy (beta > 0): DPP gain plus coverage, with c = column energies of the residual; the kept set."""
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    d, floor, penalty, cols, cols_t, offsets, flat_kernel, column, taken = _greedy_init(kernel, valid)
    c = op.ReduceSumSquare(kernel, one, keepdims=1)
    keep_d = op.Sub(op.Constant(value_float=1.0), beta)
    twice = op.Constant(value_float=2.0)
    for _ in range(keep):
        gain = op.Add(op.Mul(keep_d, op.Log(d)), op.Mul(beta, op.Log(op.Max(c, op.Mul(d, d)))))  # see dpp.greedy
        j, e = _greedy_pick(flat_kernel, d, floor, penalty, cols, cols_t, offsets, gain)
        re = op.Sub(op.MatMul(e, kernel), op.MatMul(op.MatMul(e, cols_t), cols))  # R e = L e - C^T (C e)
        sq = op.ReduceSumSquare(e, two, keepdims=1)
        c = op.Sub(c, op.Mul(e, op.Sub(op.Mul(twice, re), op.Mul(sq, e))))  # |R_i - e e_i|^2, expanded
        d, penalty, cols, cols_t = _greedy_update(d, penalty, cols, cols_t, j, e, taken, column)
    return _taken(penalty, keep)


@script()
def _spatial_factor(features: FLOAT["B", "N", "D"], keep: INT64, grid_h: INT64, grid_w: INT64, spatial: FLOAT):
    """G [N,N] = exp(-|p_i - p_j|^2 * K / (2 spatial^2 N)) on the (row, col) grid (dpp.spatial_factor).
    For spatial = 0 (cdpruner, the v1 ablation) an If returns a [1,1] one instead, so no N x N work
    is done; spatial is an initializer, so the branch is fixed per graph."""
    if op.Greater(spatial, op.Constant(value_float=0.0)):
        n = op.Squeeze(op.Slice(op.Shape(features), op.Constant(value_ints=[1]), op.Constant(value_ints=[2])))
        k = op.Cast(_budget(features, keep), to=1)
        idx = op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))
        width = op.Reshape(grid_w, op.Constant(value_ints=[]))
        row = op.Cast(op.Div(idx, width), to=1)
        col = op.Cast(op.Mod(idx, width), to=1)
        dr = op.Sub(op.Unsqueeze(row, op.Constant(value_ints=[1])), op.Unsqueeze(row, op.Constant(value_ints=[0])))
        dc = op.Sub(op.Unsqueeze(col, op.Constant(value_ints=[1])), op.Unsqueeze(col, op.Constant(value_ints=[0])))
        d2 = op.Add(op.Mul(dr, dr), op.Mul(dc, dc))
        two = op.Constant(value_float=2.0)
        scale = op.Div(k, op.Mul(op.Mul(two, op.Mul(spatial, spatial)), op.Cast(n, to=1)))
        g = op.Exp(op.Neg(op.Mul(d2, scale)))
    else:
        g = op.Constant(value_floats=[1.0])
        g = op.Reshape(g, op.Constant(value_ints=[1, 1]))
    return g


@script()
def _conditional_kernel(tokens: FLOAT["B", "N", "D"], inv: FLOAT["B", "N", 1], sim: FLOAT["B", "N", "E"],
                        valid: BOOL["B", "N"], instruction: FLOAT["B", "M", "D"], mask: INT64["B", "M"],
                        alpha: FLOAT, sign: FLOAT, spatial_factor: FLOAT["N", "N"]):
    """L = diag(w) (S * G) diag(w), w = exp(alpha * relevance of the raw `tokens`), S = sim sim^T (unit
    rows), G the spatial factor."""
    r = _relevance(tokens, inv, valid, instruction, mask, sign)
    w = op.Where(valid, op.Exp(op.Mul(alpha, r)), op.Constant(value_float=0.0))
    s = op.Mul(op.MatMul(sim, op.Transpose(sim, perm=[0, 2, 1])), spatial_factor)
    return op.Mul(op.Mul(op.Unsqueeze(w, op.Constant(value_ints=[2])), s), op.Unsqueeze(w, op.Constant(value_ints=[1])))


@script()
def _projected_kernel(image_features: FLOAT["B", "N", "D"], instruction_embeds: FLOAT["B", "M", "D"],
                      instruction_mask: INT64["B", "M"], alpha: FLOAT, sign: FLOAT, spatial_factor: FLOAT["N", "N"]):
    """The kernel with similarity on the projected tokens themselves, and token validity."""
    v, inv, valid = _unit_rows(image_features)
    kernel = _conditional_kernel(image_features, inv, v, valid, instruction_embeds, instruction_mask, alpha, sign,
                                 spatial_factor)
    return kernel, valid


@script()
def _vision_kernel(image_features: FLOAT["B", "N", "D"], instruction_embeds: FLOAT["B", "M", "D"],
                   instruction_mask: INT64["B", "M"], vision_features: FLOAT["B", "N", "E"], alpha: FLOAT, sign: FLOAT,
                   spatial_factor: FLOAT["N", "N"]):
    """The kernel with similarity on the vision features (before the projector), and token validity."""
    inv, valid_v = _row_inverse_norms(image_features)
    f, _, valid_f = _unit_rows(vision_features)
    valid = op.And(op.Squeeze(valid_v, op.Constant(value_ints=[-1])), valid_f)
    kernel = _conditional_kernel(image_features, inv, f, valid, instruction_embeds, instruction_mask, alpha, sign,
                                 spatial_factor)
    return kernel, valid


# The four DPP graphs: {similarity on the projected tokens, on the vision features} x {greedy MAP
# (cdpruner, or dpp-merge with beta = 0), greedy with coverage (dpp-merge)}. Each takes the token grid (the
# spatial factor's positions; with spatial = 0 it does not change the kernel).
@script()
def dpp_map_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, instruction_embeds: FLOAT["B", "M", "D"],
                  instruction_mask: INT64["B", "M"], grid_h: INT64, grid_w: INT64, alpha: FLOAT, sign: FLOAT,
                  spatial: FLOAT):
    g = _spatial_factor(image_features, keep, grid_h, grid_w, spatial)
    kernel, valid = _projected_kernel(image_features, instruction_embeds, instruction_mask, alpha, sign, g)
    kept_indices = _greedy_map(kernel, valid, _budget(image_features, keep))
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def dpp_coverage_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, instruction_embeds: FLOAT["B", "M", "D"],
                       instruction_mask: INT64["B", "M"], grid_h: INT64, grid_w: INT64, alpha: FLOAT, beta: FLOAT,
                       sign: FLOAT, spatial: FLOAT):
    g = _spatial_factor(image_features, keep, grid_h, grid_w, spatial)
    kernel, valid = _projected_kernel(image_features, instruction_embeds, instruction_mask, alpha, sign, g)
    kept_indices = _greedy_coverage(kernel, valid, _budget(image_features, keep), beta)
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def dpp_map_vision_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, instruction_embeds: FLOAT["B", "M", "D"],
                         instruction_mask: INT64["B", "M"], vision_features: FLOAT["B", "N", "E"], grid_h: INT64,
                         grid_w: INT64, alpha: FLOAT, sign: FLOAT, spatial: FLOAT):
    g = _spatial_factor(image_features, keep, grid_h, grid_w, spatial)
    kernel, valid = _vision_kernel(image_features, instruction_embeds, instruction_mask, vision_features, alpha, sign, g)
    kept_indices = _greedy_map(kernel, valid, _budget(image_features, keep))
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def dpp_coverage_vision_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, instruction_embeds: FLOAT["B", "M", "D"],
                              instruction_mask: INT64["B", "M"], vision_features: FLOAT["B", "N", "E"], grid_h: INT64,
                              grid_w: INT64, alpha: FLOAT, beta: FLOAT, sign: FLOAT, spatial: FLOAT):
    g = _spatial_factor(image_features, keep, grid_h, grid_w, spatial)
    kernel, valid = _vision_kernel(image_features, instruction_embeds, instruction_mask, vision_features, alpha, sign, g)
    kept_indices = _greedy_coverage(kernel, valid, _budget(image_features, keep), beta)
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def _max_min_order(similarity_features: FLOAT["B", "N", "E"], budget: INT64):
    """Greedy max-min on 1 - cos (see divprune.divprune_select), the first pick outside the loop;
    the kept set [B, K], ascending."""
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    f, _, valid = _unit_rows(similarity_features)
    dist = op.Sub(op.Constant(value_float=1.0), op.MatMul(f, op.Transpose(f, perm=[0, 2, 1])))
    eye = op.Cast(op.EyeLike(op.Squeeze(op.Slice(dist, op.Constant(value_ints=[0]), one, op.Constant(value_ints=[0])), op.Constant(value_ints=[0]))), to=9)
    blocked = op.Or(op.Unsqueeze(eye, op.Constant(value_ints=[0])), op.Unsqueeze(op.Not(valid), two))
    nearest = op.ReduceMin(op.Where(blocked, op.Constant(value_float=float("inf")), dist), one, keepdims=0)
    penalty = op.Where(valid, op.Constant(value_float=0.0), op.Constant(value_float=INVALID))
    taken = op.Constant(value_floats=[float("-inf")])
    bsz = op.Slice(op.Shape(dist), op.Constant(value_ints=[0]), one)
    n = op.Slice(op.Shape(dist), one, two)
    j = _argmax_first(op.Add(nearest, penalty))
    penalty = op.ScatterElements(penalty, j, op.Expand(taken, op.Shape(j)), axis=1)
    score = op.Squeeze(op.GatherElements(dist, op.Expand(op.Unsqueeze(j, two), op.Concat(bsz, one, n, axis=0)), axis=1), one)
    rest = op.Sub(budget, op.Constant(value_int=1))
    for _ in range(rest):
        j = _argmax_first(op.Add(score, penalty))
        penalty = op.ScatterElements(penalty, j, op.Expand(taken, op.Shape(j)), axis=1)
        row = op.Squeeze(op.GatherElements(dist, op.Expand(op.Unsqueeze(j, two), op.Concat(bsz, one, n, axis=0)), axis=1), one)
        score = op.Min(score, row)
    return _taken(op.Unsqueeze(penalty, one), budget)


@script()
def divprune_graph(image_features: FLOAT["B", "N", "D"], keep: INT64):
    kept_indices = _max_min_order(image_features, _budget(image_features, keep))
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def divprune_vision_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, vision_features: FLOAT["B", "N", "E"]):
    kept_indices = _max_min_order(vision_features, _budget(image_features, keep))
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def _top_k(scores: DOUBLE["B", "N"], k: INT64):
    """The K highest scores' indices; ONNX TopK breaks ties by the lower index, like a stable sort."""
    _, order = op.TopK(scores, op.Reshape(k, op.Constant(value_ints=[1])), axis=1, largest=1, sorted=1)
    return order


@script()
def attention_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, cls_attention: FLOAT["B", "N"]):
    finite = op.Not(op.Or(op.IsNaN(cls_attention), op.IsInf(cls_attention)))
    scores = op.Cast(op.Where(finite, cls_attention, op.Constant(value_float=INVALID)), to=11)
    kept_indices, selected_features = _sorted_and_gathered(_top_k(scores, _budget(image_features, keep)), image_features)
    return kept_indices, selected_features


@script()
def last_token_attention_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, text_attention: FLOAT["B", "Q", "N"]):
    """fastv / pdrop at a decoder cut (see scored.last_token_attention_select): top-K of the last row of
    text_attention, the prompt's last token's attention to each alive visual token; image_features are
    the alive tokens' hidden states entering the cut's layer."""
    last = op.Gather(text_attention, op.Constant(value_int=-1), axis=1)  # [B,N]
    finite = op.Not(op.Or(op.IsNaN(last), op.IsInf(last)))
    scores = op.Cast(op.Where(finite, last, op.Constant(value_float=INVALID)), to=11)
    kept_indices, selected_features = _sorted_and_gathered(_top_k(scores, _budget(image_features, keep)), image_features)
    return kept_indices, selected_features


@script()
def random_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, seed: INT64, rounds: INT64):
    """Lehmer-generator scores (see scored.random_scores), identical in int64 arithmetic to torch's."""
    one = op.Constant(value_ints=[1])
    modulus = op.Constant(value_int=LEHMER_MODULUS)
    n = op.Squeeze(op.Slice(op.Shape(image_features), one, op.Constant(value_ints=[2])))
    i = op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))
    x = op.Add(op.Mod(op.Add(i, op.Mul(op.Mod(seed, modulus), n)), op.Sub(modulus, op.Constant(value_int=1))), op.Constant(value_int=1))
    for _ in range(rounds):
        x = op.Mod(op.Mul(x, op.Constant(value_int=LEHMER_MULTIPLIER)), modulus)
    bsz = op.Slice(op.Shape(image_features), op.Constant(value_ints=[0]), one)
    scores = op.Expand(op.Unsqueeze(op.Cast(x, to=11), op.Constant(value_ints=[0])), op.Concat(bsz, op.Shape(x), axis=0))
    kept_indices, selected_features = _sorted_and_gathered(_top_k(scores, _budget(image_features, keep)), image_features)
    return kept_indices, selected_features


@script()
def uniform_graph(image_features: FLOAT["B", "N", "D"], keep: INT64, grid_h: INT64, grid_w: INT64):
    """Evenly spaced grid (see uniform.UniformGrid.indices): integer arithmetic plus one sqrt."""
    k = _budget(image_features, keep)
    rows = op.Cast(op.Ceil(op.Sqrt(op.Div(op.Mul(op.Cast(k, to=1), op.Cast(grid_h, to=1)), op.Cast(grid_w, to=1)))), to=7)
    rows = op.Max(op.Min(rows, grid_h), op.Constant(value_int=1))
    j = op.Range(op.Constant(value_int=0), k, op.Constant(value_int=1))
    one = op.Constant(value_int=1)
    two = op.Constant(value_int=2)
    r = op.Div(op.Sub(op.Mul(op.Add(j, one), rows), one), k)
    start = op.Div(op.Mul(r, k), rows)
    count = op.Sub(op.Div(op.Mul(op.Add(r, one), k), rows), start)
    col = op.Div(op.Mul(op.Add(op.Mul(two, op.Sub(j, start)), one), grid_w), op.Mul(two, count))
    row = op.Div(op.Mul(op.Add(op.Mul(two, r), one), grid_h), op.Mul(two, rows))
    idx = op.Add(op.Mul(row, grid_w), col)
    one_d = op.Constant(value_ints=[1])
    bsz = op.Slice(op.Shape(image_features), op.Constant(value_ints=[0]), one_d)
    order = op.Expand(op.Unsqueeze(idx, op.Constant(value_ints=[0])), op.Concat(bsz, op.Shape(idx), axis=0))
    kept_indices, selected_features = _sorted_and_gathered(order, image_features)
    return kept_indices, selected_features
