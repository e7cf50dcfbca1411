"""TOPS as published (selector/tops_paper.py, its ONNX forms in tops_paper_forms.py): hand-checked steps,
the invariants of TOPS.md as properties for both stages and both normalisations, the torch reference
against a direct re-computation from the definitions, and the ONNX forms against the reference."""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from tops_edge.errors import InputError
from tops_edge.models import TensorSpec
from tops_edge.selector import dpp
from tops_edge.selector import tops_paper as T
from tops_edge.selector.onnx_graph import build_graph

from feature_fixtures import image_like_tokens
from test_selector import HIDDEN, QUERY, make_inputs

CONFIGS = [(stage, norm) for stage in T.STAGES for norm in T.NORMS]
# the ablations of the paper's Table 5 (and its Stage II setting at 88.9% pruned), as parameters
ABLATIONS = [{}, {"relevance": 0.0}, {"alpha": 0.0}, {"lam": 0.0}, {"alpha": 0.0, "lam": 0.0},
             {"relevance": 0.0, "lam": 0.0}, {"relevance": 0.0, "alpha": 0.0}, {"lam": 1.0}]


# --- helpers ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The reference's per-step work is small: two torch threads on a busy two-core machine run it
    ~30x slower than one (measured); restored after this module."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def cut_inputs(rng: np.random.Generator, batch: int, n: int, *, duplicates: int = 0, degenerate: int = 0) -> dict:
    """make_inputs (test_selector) plus text_features [B,Q,D], the prompt's hidden states at the cut:
    with degenerate tokens, some prompt rows are NaN, inf or zero (padding) too."""
    x = make_inputs(rng, batch, n, duplicates=duplicates, degenerate=degenerate)
    extra = rng.spawn(1)[0]
    x["text_features"] = extra.standard_normal((batch, QUERY, HIDDEN)).astype(np.float32)
    for b in range(batch):
        if duplicates and extra.random() < 0.5:  # two identical prompt tokens
            x["text_features"][b, 1] = x["text_features"][b, 0]
        if degenerate and extra.random() < 0.5:
            q = int(extra.integers(QUERY))
            kind = int(extra.integers(3))
            x["text_features"][b, q, slice(None) if kind == 2 else int(extra.integers(HIDDEN))] = (np.nan, np.inf, 0.0)[kind]
    return x


def inputs_for(stage: str, rng, batch: int, n: int, **kw) -> dict:
    x = cut_inputs(rng, batch, n, **kw) if stage == "llm" else make_inputs(rng, batch, n, **kw)
    names = ("image_features", "cls_attention") if stage == "vision" else ("image_features", "text_attention", "text_features")
    return {k: x[k] for k in names}


def params_for(stage: str, norm: str, extra: dict | None = None) -> dict:
    return {**T.default_params(stage), "norm": norm, **(extra or {})}


def reference(stage: str, x: dict, keep: int, params: dict) -> np.ndarray:
    return T.tops_paper_reference({k: torch.from_numpy(v) for k, v in x.items()}, keep, params, stage).numpy()


def graph(stage: str, params: dict, hidden=HIDDEN):
    """The selector graph as the lead would declare it: image_features, keep, the stage's inputs."""
    fn, constants = T.tops_paper_onnx(params, stage)
    specs = {"cls_attention": TensorSpec("cls_attention", "float32", ("num_images", "tokens")),
             "text_attention": TensorSpec("text_attention", "float32", ("num_images", "queries", "tokens")),
             "text_features": TensorSpec("text_features", "float32", ("num_images", "queries", hidden))}
    inputs = [TensorSpec("image_features", "float32", ("num_images", "tokens", hidden)), TensorSpec("keep", "int64", ()),
              *(specs[name] for name in T.tops_paper_inputs(params, stage))]
    outputs = [TensorSpec("kept_indices", "int64", ("num_images", "kept")),
               TensorSpec("selected_features", "float32", ("num_images", "kept", hidden))]
    return build_graph(fn, constants, inputs, outputs)


@functools.lru_cache(maxsize=None)
def _session(stage: str, params: tuple, hidden: int) -> ort.InferenceSession:
    model = graph(stage, dict(params), hidden)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def onnx_select(stage: str, x: dict, keep: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    sess = _session(stage, tuple(sorted(params.items())), x["image_features"].shape[-1])
    feeds = dict(x, keep=np.array(keep, dtype=np.int64))
    idx, sel = sess.run(["kept_indices", "selected_features"], {i.name: feeds[i.name] for i in sess.get_inputs()})
    return idx, sel


# --- a direct re-computation from the definitions (float64, one token at a time) ------------------
def direct_text_relevance(h, t, a, scaling="none"):
    """(raters, r, rater relevances, their mean) for one image, from the definitions, in loops."""
    n, q_len = len(h), len(t)
    ok = lambda row: bool(np.isfinite(row).all() and np.abs(row).sum() > 0)  # noqa: E731
    valid_v = [v for v in range(n) if ok(h[v])]
    valid_t = [q for q in range(q_len) if ok(t[q])]
    scale = 1 / np.sqrt(h.shape[-1]) if scaling == "sqrt_d" else 1.0
    rel = {q: 0.0 for q in valid_t}
    for v in valid_v if valid_t else []:
        logits = {q: float(np.dot(h[v].astype(np.float64), t[q].astype(np.float64))) * scale for q in valid_t}
        top = max(logits.values())
        z = sum(np.exp(lq - top) for lq in logits.values())
        for q in valid_t:
            rel[q] += np.exp(logits[q] - top) / z / len(valid_v)
    mean = sum(rel.values()) / max(len(valid_t), 1)
    raters = [q for q in valid_t if rel[q] > mean] or valid_t
    r = np.zeros(n)
    for v in range(n):
        entries = [float(a[q, v]) for q in raters if np.isfinite(a[q, v])]
        r[v] = np.mean(entries) if entries else (np.nan if raters else 0.0)
    return raters, r, rel, mean


def direct_scores(h, r, chosen, alpha, lam, norm, weight):
    """{candidate: score} given the kept list `chosen`, from the definitions, in loops (float64)."""
    n = len(h)
    valid = [bool(np.isfinite(h[i]).all() and np.abs(h[i]).sum() > 0 and np.isfinite(r[i])) for i in range(n)]
    unit = [h[i].astype(np.float64) / np.linalg.norm(h[i].astype(np.float64)) if valid[i] else np.zeros(h.shape[1])
            for i in range(n)]
    sim = lambda i, j: float(np.dot(unit[i], unit[j]))  # noqa: E731
    rest = [j for j in range(n) if j not in chosen]
    cand = [i for i in rest if valid[i]]
    if not cand:
        return {}
    m = {j: max(sim(j, k) for k in chosen) for j in range(n)}
    terms = {"r": {i: float(r[i]) for i in cand}, "d": {i: 1 - m[i] for i in cand},
             "c": {i: sum(max(0.0, sim(i, j) - m[j]) for j in rest) for i in cand}}
    out = {i: 0.0 for i in cand}
    for name, w in (("r", weight), ("c", lam), ("d", alpha)):
        x = terms[name]
        lo, hi, mean = min(x.values()), max(x.values()), sum(x.values()) / len(x)
        for i in cand:
            if norm == "minmax":
                out[i] += w * ((x[i] - lo) / (hi - lo) if hi - lo > 1e-9 * max(abs(lo), abs(hi), 1e-9) else 0.0)
            else:
                out[i] += w * (x[i] / mean if abs(mean) > 1e-9 else 0.0)
    return out


# --- hand-checked cases -------------------------------------------------------------------------
# four unit vectors in the plane with rational cosines: a = (1, 0), b = (.8, .6), c = (.6, .8), d = (0, 1)
#      a    b    c    d
# a    1   .8   .6    0
# b   .8    1  .96   .6
# c   .6  .96    1   .8
# d    0   .6   .8    1
PLANE = np.array([[[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]], np.float32) * np.array([[[1.0], [2.0], [0.5], [3.0]]], np.float32)
PLANE_R = np.array([[1.0, 0.9, 0.5, 0.0]], np.float32)
# After the seed a (argmax r): m = (1, .8, .6, 0); candidates b, c, d:
#   r = (.9, .5, 0)   d = 1 - m = (.2, .4, 1)
#   c_b = (1 - .8) + (.96 - .6) + (.6 - 0) = 1.16,  c_c = (.96 - .8) + (1 - .6) + (.8 - 0) = 1.36,
#   c_d = 0 + (.8 - .6) + (1 - 0) = 1.2
# min-max: r~ = (1, 5/9, 0), c~ = (0, 1, .2), d~ = (0, .25, 1)
# mean:    r~ = (.9, .5, 0) / (1.4/3), c~ = (1.16, 1.36, 1.2) / 1.24, d~ = (.2, .4, 1) / (1.6/3)
HAND = {
    "minmax": {"r": [1.0, 5 / 9, 0.0], "c": [0.0, 1.0, 0.2], "d": [0.0, 0.25, 1.0]},
    "mean": {"r": [0.9 * 3 / 1.4, 0.5 * 3 / 1.4, 0.0], "c": [1.16 / 1.24, 1.36 / 1.24, 1.2 / 1.24],
             "d": [0.2 * 3 / 1.6, 0.4 * 3 / 1.6, 1.0 * 3 / 1.6]},
}


@pytest.mark.parametrize("norm", T.NORMS)
@pytest.mark.parametrize("weights", [(1.0, 0.5, 0.5), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.5, 0.5),
                                     (1.0, 0.0, 0.5), (1.0, 0.5, 0.0)])
def test_first_step_scores_by_hand(norm, weights):
    relevance, alpha, lam = weights
    sim, r, valid = T.prepare(torch.from_numpy(PLANE), torch.from_numpy(PLANE_R))
    m = sim[:, 0]
    cand = torch.tensor([[False, True, True, True]])
    got = T.step_scores(sim, m, cand, r, alpha=alpha, lam=lam, norm=norm, relevance_weight=relevance)[0, 1:]
    h = HAND[norm]
    want = [relevance * h["r"][i] + lam * h["c"][i] + alpha * h["d"][i] for i in range(3)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)  # the hinge at SIM_TOL moves c and d by < 1e-4


# the second pick (after the seed a = 0) by hand from the table above, for each switch
@pytest.mark.parametrize("norm, relevance, alpha, lam, second", [
    ("minmax", 1, 0.5, 0.5, 2),  # b 1, c 5/9 + .5 + .125 = 1.18, d .1 + .5 = .6
    ("minmax", 1, 0, 0, 1),      # relevance only
    ("minmax", 0, 1, 0, 3),      # diversity only: the farthest from a
    ("minmax", 0, 0, 1, 2),      # coverage only
    ("minmax", 1, 0.5, 0, 1),    # R + D: b 1, c .68, d .5
    ("minmax", 1, 0, 0.5, 2),    # R + C: b 1, c 1.06, d .1
    ("minmax", 0, 0.5, 0.5, 2),  # D + C: b 0, c .625, d .6
    ("minmax", 0, 0, 0, 1),      # every criterion off: the lowest index
    ("mean", 1, 0.5, 0.5, 1),    # b 1.93 + .47 + .19 = 2.58, c 1.07 + .55 + .38 = 1.99, d .48 + .94 = 1.42
    ("mean", 0, 1, 0, 3),
    ("mean", 0, 0, 1, 2),
    ("mean", 1, 0, 0.5, 1),      # R + C: b 2.40, c 1.62, d .48
    ("mean", 0, 0.5, 0.5, 3),    # D + C: b .66, c .92, d 1.42
])
def test_second_pick_by_hand(norm, relevance, alpha, lam, second):
    order = T.tops_order(torch.from_numpy(PLANE), torch.from_numpy(PLANE_R), 2, alpha=alpha, lam=lam, norm=norm,
                         relevance_weight=relevance)
    assert order.tolist() == [[0, second]]


def test_whole_orders_by_hand():
    """minmax, alpha = lam = .5, after {a, c}: m = (1, .96, 1, .8); b: r~ 1, c~ 0 (c_b = .04, c_d = .2),
    d~ 0 (.04 vs .2); d: 0, 1, 1: b scores 1, d scores .5 + .5 = 1, a tie, to the lower index b.
    mean, after {a, b}: m = (1, 1, .96, .6); c: r~ 2, c~ .24/.32, d~ .04/.22 -> 2.47; d: 0, 1.25, 1.82 -> 1.53."""
    f, r = torch.from_numpy(PLANE), torch.from_numpy(PLANE_R)
    assert T.tops_order(f, r, 4, alpha=0.5, lam=0.5, norm="minmax").tolist() == [[0, 2, 1, 3]]
    assert T.tops_order(f, r, 4, alpha=0.5, lam=0.5, norm="mean").tolist() == [[0, 1, 2, 3]]
    assert T.tops_select(f, r, 2, alpha=0.5, lam=0.5).tolist() == [[0, 2]]
    x = {"image_features": PLANE, "cls_attention": PLANE_R}
    for norm, order in (("minmax", [0, 2, 1, 3]), ("mean", [0, 1, 2, 3])):  # the ONNX forms take the same steps
        for k in (1, 2, 3, 4):
            assert onnx_select("vision", x, k, params_for("vision", norm))[0].tolist() == [sorted(order[:k])]


def test_orthogonal_tokens_go_by_relevance_because_flat_terms_count_zero():
    """Orthogonal tokens (any lengths): every candidate has d = 1 and c = 1 (its own term only), so
    both terms are flat, normalise to 0, and the order is the relevance order, for either norm."""
    f = torch.diag(torch.tensor([1.0, 5.0, 0.2, 3.0])).unsqueeze(0)
    r = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    for norm in T.NORMS:
        assert T.tops_order(f, r, 4, alpha=0.5, lam=0.5, norm=norm).tolist() == [[1, 3, 2, 0]]


def test_a_duplicate_of_a_kept_token_adds_nothing():
    """Token 1 duplicates the seed 0: its d and c are 0 (exactly, through the hinge), so with
    alpha = lam = 1 it comes last despite its relevance; with relevance only it comes second."""
    f = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    r = torch.tensor([[1.0, 0.9, 0.1, 0.3]])
    sim, rr, _ = T.prepare(f, r)
    c, d = T.step_terms(sim, sim[:, 0], torch.tensor([[False, True, True, True]]))
    assert c[0, 1] == 0 and d[0, 1] == 0
    # step 1: token 1 scores r~ 1; 2: c~ 1 + d~ 1; 3: .25 + 1 + 1 -> 3; step 2: 1: 1; 2: 2 -> 2
    assert T.tops_order(f, r, 4, alpha=1.0, lam=1.0).tolist() == [[0, 3, 2, 1]]
    assert T.tops_order(f, r, 4, alpha=0.0, lam=0.0).tolist() == [[0, 1, 3, 2]]


def test_the_seed_is_the_most_relevant_token_ties_to_the_lowest_index():
    rng = np.random.default_rng(0)
    f = torch.from_numpy(rng.standard_normal((1, 6, 8)).astype(np.float32))
    r = torch.tensor([[0.2, 0.7, 0.1, 0.7, 0.3, 0.0]])
    for relevance in (1.0, 0.0):  # the seed is argmax r even with the relevance term off
        assert T.tops_order(f, r, 1, alpha=0.5, lam=0.5, relevance_weight=relevance).tolist() == [[1]]
    assert T.tops_order(f, torch.zeros(1, 6), 1, alpha=0.5, lam=0.5).tolist() == [[0]]


# --- the text raters ----------------------------------------------------------------------------
def test_text_raters_by_hand():
    """Both visual tokens are (1, 0); prompt tokens (2, 0), (0, 1), (-1, 0), zero (padding): the
    softmax over the three valid ones is (e^2, 1, e^-1) / Z = (.84, .11, .04) for every visual
    token, above the mean 1/3 only for the first: r = the first prompt token's attention row."""
    h = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    t = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]]])
    a = torch.tensor([[[0.2, 0.6], [0.5, 0.1], [0.3, 0.3], [9.0, 9.0]]])
    for scaling in T.RATER_SCALINGS:  # / sqrt(2): (e^1.41, 1, e^-.71) / Z = (.73, .18, .09): the same raters
        assert T.text_raters(h, t, rater_scaling=scaling).tolist() == [[True, False, False, False]]
        assert T.text_rater_relevance(h, t, a, rater_scaling=scaling)[0].tolist() == pytest.approx([0.2, 0.6])
    # one prompt token, or all identical: nobody is above the mean, every valid one rates
    assert T.text_raters(h, t[:, :1]).tolist() == [[True]]
    same = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    assert T.text_raters(h, same).tolist() == [[True, True, False]]
    np.testing.assert_allclose(T.text_rater_relevance(h, same, a[:, :3]).numpy(), [[0.35, 0.35]], rtol=1e-6)
    # no valid prompt token: no relevance signal, r = 0
    assert T.text_rater_relevance(h, torch.zeros(1, 2, 2), a[:, :2]).tolist() == [[0.0, 0.0]]
    # a non-finite entry is left out of its token's mean; a token with no finite rater entry has none
    b = a.clone()
    b[0, 0, 1] = float("nan")
    r = T.text_rater_relevance(h, t, b)
    assert r[0, 0] == pytest.approx(0.2) and torch.isnan(r[0, 1])


@pytest.mark.parametrize("scaling", T.RATER_SCALINGS)
def test_text_rater_relevance_equals_a_direct_loop(scaling):
    rng = np.random.default_rng(11)
    checked = 0
    for case in range(150):
        n, q = int(rng.integers(1, 30)), int(rng.integers(1, 7))
        h = rng.standard_normal((2, n, 8)).astype(np.float32) * rng.uniform(0.1, 3)
        t = rng.standard_normal((2, q, 8)).astype(np.float32) * rng.uniform(0.1, 3)
        a = rng.random((2, q, n)).astype(np.float32)
        for b in range(2):
            if rng.random() < 0.3:
                h[b, rng.integers(n), rng.integers(8)] = (np.nan, np.inf)[rng.integers(2)]
            if rng.random() < 0.3:
                t[b, rng.integers(q)] = (np.nan, 0.0)[rng.integers(2)]
            if rng.random() < 0.3:
                a[b, rng.integers(q), rng.integers(n)] = (np.nan, np.inf, -np.inf)[rng.integers(3)]
            if rng.random() < 0.1:
                a[b, rng.integers(q)] = np.nan
            if q > 1 and rng.random() < 0.2:
                t[b, 1] = t[b, 0]
        raters = T.text_raters(torch.from_numpy(h), torch.from_numpy(t), rater_scaling=scaling).numpy()
        r = T.text_rater_relevance(torch.from_numpy(h), torch.from_numpy(t), torch.from_numpy(a), rater_scaling=scaling).numpy()
        for b in range(2):
            want_raters, want_r, rel, mean = direct_text_relevance(h[b], t[b], a[b], scaling)
            if any(0 < abs(v - mean) <= 1e-4 * mean for v in rel.values()):
                continue  # a relevance at the threshold: fp32 and float64 may put it either side
            assert np.flatnonzero(raters[b]).tolist() == want_raters, f"case {case}"
            np.testing.assert_allclose(r[b], want_r, rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked > 250


def test_stage_two_follows_the_prompt():
    """Visual tokens near two directions; a prompt pointing at either makes its attention rows the
    raters, and TOPS keeps the tokens those rows attend to."""
    rng = np.random.default_rng(3)
    n = 40
    u, v = rng.standard_normal(HIDDEN), rng.standard_normal(HIDDEN)
    h = rng.standard_normal((1, n, HIDDEN)) * 0.3
    h[0, :20] += 3 * u
    h[0, 20:] += 3 * v
    attention = np.zeros((1, 2, n))
    attention[0, 0, :20] = rng.random(20) + 1  # prompt token 0 attends to the u half, token 1 to the v half
    attention[0, 1, 20:] = rng.random(20) + 1
    picks = []
    for direction in (0, 1):
        t = np.stack([u, v])[None] * np.where(np.arange(2) == direction, 3.0, -3.0)[None, :, None]
        x = {"image_features": h.astype(np.float32), "text_attention": attention.astype(np.float32),
             "text_features": t.astype(np.float32)}
        kept = reference("llm", x, 6, params_for("llm", "minmax", {"alpha": 0.0, "lam": 0.0}))[0]
        picks.append(kept.tolist())
        assert all((k < 20) == (direction == 0) for k in kept)
        assert onnx_select("llm", x, 6, params_for("llm", "minmax", {"alpha": 0.0, "lam": 0.0}))[0][0].tolist() == picks[-1]


# --- the reference against the definitions --------------------------------------------------------
@pytest.mark.parametrize("norm", T.NORMS)
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_step_picks_the_best_score_of_the_definitions(norm, ablation):
    """Replaying the reference's picks, every pick scores the best of the candidates (within 1e-4)
    by the definitions recomputed from scratch per step (float64, one token at a time)."""
    p = params_for("vision", norm, ablation)
    rng = np.random.default_rng(sum(map(ord, norm + str(ablation))))
    for case in range(12):
        n = int(rng.integers(2, 25))
        x = make_inputs(rng, 1, n, degenerate=int(rng.integers(0, 3)))
        h, r = x["image_features"][0], x["cls_attention"][0]
        order = T.tops_order(torch.from_numpy(x["image_features"]), torch.from_numpy(x["cls_attention"]), n,
                             alpha=p["alpha"], lam=p["lam"], norm=norm, relevance_weight=p["relevance"])[0].tolist()
        valid = [bool(np.isfinite(h[i]).all() and np.abs(h[i]).sum() > 0 and np.isfinite(r[i])) for i in range(n)]
        assert order[0] == int(np.argmax([r[i] if valid[i] else -np.inf for i in range(n)]))  # the seed: argmax r
        for step in range(1, n):
            scores = direct_scores(h, r, order[:step], p["alpha"], p["lam"], norm, p["relevance"])
            pick = order[step]
            if not scores:  # only degenerate tokens left: the lowest index
                assert pick == min(set(range(n)) - set(order[:step]))
                continue
            assert pick in scores, f"case {case} step {step}: a degenerate token beat a valid one"
            assert scores[pick] >= max(scores.values()) - 1e-4, f"case {case} step {step}"


# --- invariants as properties, on the torch reference and the ONNX forms --------------------------
cases = st.tuples(st.integers(2, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("stage, norm", CONFIGS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_k_distinct_ascending_in_range_and_deterministic(stage, norm, case):
    n, k, seed = case
    k = min(k, n)
    p = params_for(stage, norm)
    x = inputs_for(stage, np.random.default_rng(seed), 2, n, duplicates=2, degenerate=1)
    for idx in (reference(stage, x, k, p), onnx_select(stage, x, k, p)[0]):
        assert idx.shape == (2, k)
        for row in idx:
            assert list(row) == sorted(set(row.tolist())) and 0 <= row[0] and row[-1] < n
    assert np.array_equal(reference(stage, x, k, p), reference(stage, x, k, p))
    assert np.array_equal(onnx_select(stage, x, k, p)[0], onnx_select(stage, x, k, p)[0])


@pytest.mark.parametrize("stage, norm", CONFIGS)
@pytest.mark.parametrize("n", [1, 7, 36])
def test_keep_at_least_n_is_the_identity(stage, norm, n):
    p = params_for(stage, norm)
    x = inputs_for(stage, np.random.default_rng(n), 2, n, degenerate=min(n, 2))
    for k in (n, n + 5):
        assert np.array_equal(reference(stage, x, k, p), np.tile(np.arange(n), (2, 1)))
        idx, sel = onnx_select(stage, x, k, p)
        assert np.array_equal(idx, np.tile(np.arange(n), (2, 1)))
        assert np.array_equal(sel, x["image_features"], equal_nan=True)


def valid_tokens(stage: str, x: dict, params: dict) -> np.ndarray:
    """[B,N] which tokens are valid (finite, non-zero features and a finite relevance), from the
    direct loops."""
    f = x["image_features"]
    ok = np.isfinite(f).all(-1) & (np.abs(f).sum(-1) > 0)
    if stage == "vision":
        return ok & np.isfinite(x["cls_attention"])
    r = np.stack([direct_text_relevance(f[b], x["text_features"][b], x["text_attention"][b], params["rater_scaling"])[1]
                  for b in range(len(f))])
    return ok & np.isfinite(r)


@pytest.mark.parametrize("stage, norm", CONFIGS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_degenerate_tokens_are_never_chosen_over_finite_ones(stage, norm, case):
    n, k, seed = case
    rng = np.random.default_rng(seed)
    p = params_for(stage, norm)
    x = inputs_for(stage, rng, 1, n, degenerate=int(rng.integers(1, n)) if n > 1 else 0)
    if stage == "llm" and rng.random() < 0.5:  # a whole column non-finite: no rater has an entry
        x["text_attention"][0, :, int(rng.integers(n))] = np.nan
    finite = valid_tokens(stage, x, p)
    k = min(k, int(finite.sum())) or 1
    for idx in (reference(stage, x, k, p), onnx_select(stage, x, k, p)[0]):
        if finite.sum():
            assert finite[0, idx[0]].all()


TOKEN_AXIS = {"image_features": 1, "cls_attention": 1, "text_attention": 2}  # text_features: no token axis


def permuted(x: dict, perm) -> dict:
    """The same inputs with the visual tokens in the order `perm`."""
    return {key: np.take(v, perm, axis=TOKEN_AXIS[key]) if key in TOKEN_AXIS else v for key, v in x.items()}


def decided_without_ties(stage: str, x: dict, keep: int, params: dict) -> bool:
    """No step is decided by the tie rule: the tolerant and an exact argmax pick the same tokens, on
    the input and on the tokens in reverse order (as test_selector.decided_without_ties)."""
    n = x["image_features"].shape[1]
    rev = permuted(x, np.arange(n)[::-1])
    picks = []
    for tol in (dpp.TIE_TOL, 0.0):
        saved, dpp.TIE_TOL = dpp.TIE_TOL, tol
        try:
            picks.append(set(reference(stage, x, keep, params)[0].tolist()))
            picks.append({n - 1 - i for i in reference(stage, rev, keep, params)[0].tolist()})
        finally:
            dpp.TIE_TOL = saved
    return all(p == picks[0] for p in picks)


@pytest.mark.parametrize("stage, norm", CONFIGS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_permuting_tokens_permutes_the_chosen_set(stage, norm, case):
    """Content only: no position enters TOPS (ties aside, which go to the lowest index)."""
    n, k, seed = case
    rng = np.random.default_rng(seed)
    k = min(k, n)
    p = params_for(stage, norm)
    x = inputs_for(stage, rng, 1, n)
    perm = rng.permutation(n)
    px = permuted(x, perm)
    assume(decided_without_ties(stage, x, k, p) and decided_without_ties(stage, px, k, p))
    assert {int(perm[i]) for i in reference(stage, px, k, p)[0]} == set(reference(stage, x, k, p)[0].tolist())


@pytest.mark.parametrize("stage, norm", CONFIGS)
def test_batch_gives_what_each_item_gives_alone(stage, norm):
    p = params_for(stage, norm)
    x = inputs_for(stage, np.random.default_rng(5), 3, 25, duplicates=2, degenerate=2)
    batched_ref, batched_onnx = reference(stage, x, 9, p), onnx_select(stage, x, 9, p)[0]
    for b in range(3):
        one = {key: v[b : b + 1] for key, v in x.items()}
        assert np.array_equal(reference(stage, one, 9, p)[0], batched_ref[b])
        assert np.array_equal(onnx_select(stage, one, 9, p)[0][0], batched_onnx[b])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fp32_whatever_the_input_dtype(dtype):
    rng = np.random.default_rng(2)
    x = cut_inputs(rng, 2, 30)
    low = {k: torch.from_numpy(v).to(dtype) for k, v in x.items() if k in ("image_features", "text_attention", "text_features")}
    as_fp32 = {k: v.float() for k, v in low.items()}
    for stage in T.STAGES:
        if stage == "vision":
            low["cls_attention"] = torch.from_numpy(x["cls_attention"]).to(dtype)
            as_fp32["cls_attention"] = low["cls_attention"].float()
        p = T.default_params(stage)
        assert torch.equal(T.tops_paper_reference(low, 8, p, stage), T.tops_paper_reference(as_fp32, 8, p, stage))


# --- ONNX form == torch reference ------------------------------------------------------------------
@pytest.mark.parametrize("stage, norm", CONFIGS)
def test_onnx_form_returns_the_reference_indices_on_200_random_cases(stage, norm):
    rng = np.random.default_rng(sum(map(ord, stage + norm)))
    for case in range(200):
        n = int(rng.integers(2, 65))
        k = int(rng.integers(1, n + 1))
        p = params_for(stage, norm, ABLATIONS[case % len(ABLATIONS)])
        if stage == "llm" and case % 3 == 0:
            p["rater_scaling"] = "sqrt_d"
        x = inputs_for(stage, rng, int(rng.integers(1, 3)), n, duplicates=int(rng.integers(0, 4)),
                       degenerate=int(rng.integers(0, 3)))
        idx, sel = onnx_select(stage, x, k, p)
        ref = reference(stage, x, k, p)
        assert np.array_equal(idx, ref), f"case {case}: n={n} k={k} {p}"
        gathered = np.take_along_axis(x["image_features"], ref[..., None], axis=1)
        assert np.array_equal(sel, gathered, equal_nan=True)


def test_onnx_forms_agree_at_llava_shapes():
    """N = 576 alive tokens, the budgets the product uses (2T before the LLM, T/2 at a cut)."""
    rng = np.random.default_rng(0)
    x = {"image_features": rng.standard_normal((1, 576, 64)).astype(np.float32),
         "cls_attention": rng.random((1, 576)).astype(np.float32) / 576,
         "text_attention": rng.random((1, 12, 576)).astype(np.float32) / 600,
         "text_features": rng.standard_normal((1, 12, 64)).astype(np.float32)}
    for stage, norm in CONFIGS:
        p = params_for(stage, norm)
        for k in (64, 128):
            assert np.array_equal(onnx_select(stage, x, k, p)[0], reference(stage, x, k, p)), (stage, norm, k)


@pytest.mark.parametrize("stage", T.STAGES)
def test_image_like_tokens_give_k_distinct_tokens_and_the_forms_agree(stage):
    """Near-duplicate features (median cosine ~0.9996, as measured on the ShapesVQA model's)."""
    for seed in range(2):
        image, _ = image_like_tokens(12, seed, hidden=HIDDEN)
        x = inputs_for(stage, np.random.default_rng(seed), 1, 144)
        x["image_features"] = image
        for norm in T.NORMS:
            p = params_for(stage, norm)
            for k in (8, 40, 100):
                ref = reference(stage, x, k, p)[0]
                assert len(set(ref.tolist())) == k
                assert np.array_equal(onnx_select(stage, x, k, p)[0][0], ref), (seed, norm, k)


@pytest.mark.parametrize("stage", T.STAGES)
def test_graphs_take_the_stage_inputs_use_standard_ops_and_k_at_run_time(stage):
    for norm in T.NORMS:
        p = params_for(stage, norm)
        model = graph(stage, p)
        names = ["image_features", "keep", *(("cls_attention",) if stage == "vision" else ("text_attention", "text_features"))]
        assert [i.name for i in model.graph.input] == names
        assert [o.name for o in model.graph.output] == ["kept_indices", "selected_features"]
        assert {i.name for i in model.graph.initializer} >= ({"alpha", "lam", "relevance"} |
                                                             ({"rater_sqrt_d"} if stage == "llm" else set()))
        assert {node.domain for node in model.graph.node} <= {""}
        assert sum(node.op_type == "Loop" for node in model.graph.node) == 1
    x = inputs_for(stage, np.random.default_rng(1), 1, 20)
    for k in (1, 5, 19):  # one graph, any budget
        assert onnx_select(stage, x, k, p)[0].shape == (1, k)


@pytest.mark.parametrize("bad", [{"norm": "median"}, {"alpha": -1.0}, {"lam": float("inf")}, {"relevance": float("nan")},
                                 {"rater_scaling": "sqrt"}])
def test_parameters_are_checked(bad):
    stage = "llm"
    with pytest.raises(InputError, match=next(iter(bad))):
        T.check_params({**T.default_params(stage), **bad}, stage)
    assert T.tops_paper_inputs(T.default_params("vision"), "vision") == ("cls_attention",)
    assert T.tops_paper_inputs(T.default_params("llm"), "llm") == ("text_attention", "text_features")
