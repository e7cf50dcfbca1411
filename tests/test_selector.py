"""Selectors: the invariants of TOPS.md as properties, and every ONNX form against its torch reference."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from tops_edge import selector
from tops_edge.errors import InputError
from tops_edge.selector.parts import selector_part
from tops_edge.selector import topv as T
from tops_edge.selector.dpp import conditional_kernel, greedy, relevance, sanitize
from tops_edge.selector.uniform import UniformGrid

from feature_fixtures import image_like_tokens

PRUNING = [m for m in selector.available() if selector.get(m).prunes]
# fastv, pdrop: read text_attention at a cut (topv, also in the LLM, reads no attention: test_topv.py)
IN_LLM = [m for m in PRUNING if selector.get(m).stage == "llm"
          and "text_attention" in selector.get(m).extra_inputs(selector.get(m).resolve_params())]
# uniform and random look only at positions; topv at content and positions (its spatial and centre
# terms, and the recovery stride over index order): its permutation and degenerate-token properties
# are in test_topv.py, with the positions moved along and near ties set aside
CONTENT_BASED = ["dpp-merge", "cdpruner", "divprune", "attention", *IN_LLM]
# the forms must return exactly the reference's indices; topv's equality allows a decision the
# reference took within 1e-4 of a tie (importances of random tokens are close): test_topv.py
EXACT = [m for m in PRUNING if m != "topv"]
HIDDEN, VISION, TEXT = 16, 48, 6  # vision width >= N below, so similarity has full rank (no exhausted ties)
QUERY = 3  # prompt tokens after the image: the rows of text_attention (the last one is read)
TOKEN_AXIS = {"image_features": 1, "vision_features": 1, "cls_attention": 1, "text_attention": 2,
              "target_features": 1, "token_positions": 1}


def make_inputs(rng: np.random.Generator, batch: int, n: int, *, duplicates: int = 0, degenerate: int = 0) -> dict:
    # text_attention comes from a child generator (spawning does not advance `rng`), so the other
    # inputs, and the cases drawn after them, are what they were before it was added
    extra = rng.spawn(1)[0]
    # topv's targets from a child of that child (spawning does not advance `extra` either)
    probe = extra.spawn(1)[0]
    x = {
        "image_features": rng.standard_normal((batch, n, HIDDEN)).astype(np.float32),
        "vision_features": rng.standard_normal((batch, n, VISION)).astype(np.float32),
        "instruction_embeds": rng.standard_normal((batch, TEXT, HIDDEN)).astype(np.float32),
        "instruction_mask": (rng.random((batch, TEXT)) < 0.8).astype(np.int64),
        "cls_attention": rng.random((batch, n)).astype(np.float32),
        "text_attention": extra.random((batch, QUERY, n)).astype(np.float32),
    }
    # topv: targets a noisy RMS-normalised copy of the sources (a post-attention norm of the same
    # tokens; a degenerate source makes its target degenerate too), positions on the tokens' grid
    noisy = x["image_features"] + 0.5 * probe.standard_normal((batch, n, HIDDEN)).astype(np.float32)
    x["target_features"] = (noisy / np.sqrt((noisy * noisy).mean(-1, keepdims=True))).astype(np.float32)
    x["token_positions"] = np.broadcast_to(T.token_positions(np.arange(n), *grid_for(n)), (batch, n, 2)).copy()
    if extra.random() < 0.25:  # coarse attention: many exact ties (to the lowest index)
        x["text_attention"] = np.round(x["text_attention"] * 8) / 8
    for b in range(batch):
        for _ in range(duplicates):  # exact copies: ties in similarity and in attention
            i, j = rng.choice(n, 2, replace=False)
            for key in ("image_features", "vision_features", "cls_attention", "target_features"):
                x[key][b, j] = x[key][b, i]
            x["text_attention"][b, :, j] = x["text_attention"][b, :, i]
        for i in rng.choice(n, degenerate, replace=False):
            kind = rng.integers(3)
            bad = (np.nan, np.inf, 0.0)[kind]
            x["image_features"][b, i, rng.integers(HIDDEN) if kind < 2 else slice(None)] = bad
            x["target_features"][b, i] = x["image_features"][b, i]
            x["vision_features"][b, i, rng.integers(VISION) if kind < 2 else slice(None)] = bad
            x["cls_attention"][b, i] = (np.nan, np.inf, np.nan)[kind]
            x["text_attention"][b, -1, i] = (np.nan, np.inf, -np.inf)[kind]
        if degenerate:  # a whole non-finite row: an earlier prompt token's (never read), at times the last
            row = -1 if extra.random() < 0.125 else int(extra.integers(QUERY - 1))
            x["text_attention"][b, row] = (np.nan, np.inf)[int(extra.integers(2))]
    return x


def permute_tokens(x: dict, perm) -> dict:
    """The same inputs with the visual tokens in the order `perm` (a token axis per input)."""
    out = dict(x)
    for key, axis in TOKEN_AXIS.items():
        out[key] = np.take(x[key], perm, axis=axis)
    return out


def grid_for(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    return (side, side) if side * side == n else (1, n)


def reference(method: str, x: dict, keep: int, params: dict | None = None) -> np.ndarray:
    info = selector.get(method)
    tensors = {k: torch.from_numpy(v) for k, v in x.items()}
    n = x["image_features"].shape[1]
    return info.reference(tensors, keep, info.resolve_params(params), grid_for(n)).numpy()


def in_llm_graph(method: str, params: dict, n, hidden: int):
    """An in-LLM selector graph as the registry defines it: inputs image_features [B,N,D] (the alive
    tokens' hidden states), keep, text_attention [B,Q,N] (fastv, pdrop) or target_features [B,N,D]
    and token_positions [B,N,2] (topv); outputs kept_indices, selected_features."""
    from tops_edge.models import TensorSpec
    from tops_edge.selector.onnx_graph import build_graph

    info = selector.get(method)
    shapes = {"text_attention": ("num_images", "query", n), "target_features": ("num_images", n, hidden),
              "token_positions": ("num_images", n, 2)}
    inputs = [TensorSpec("image_features", "float32", ("num_images", n, hidden)), TensorSpec("keep", "int64", ()),
              *(TensorSpec(name, "float32", shapes[name]) for name in info.extra_inputs(params))]
    outputs = [TensorSpec("kept_indices", "int64", ("num_images", "kept")),
               TensorSpec("selected_features", "float32", ("num_images", "kept", hidden))]
    fn, constants = info.onnx_form(params, grid_for(n) if isinstance(n, int) else (1, n))
    return build_graph(fn, constants, inputs, outputs)


@functools.lru_cache(maxsize=None)
def _session(method: str, n: int, hidden: int, vision: int, params: tuple) -> ort.InferenceSession:
    info = selector.get(method)
    if info.stage == "llm":  # the graph as registered (its export wiring is the segmented decoder's)
        model = in_llm_graph(method, info.resolve_params(dict(params)), n, hidden)
    else:
        layout = {"layout": "single", "tokens_per_crop": n, "grid": list(grid_for(n))}
        model = selector_part(method, info.resolve_params(dict(params)), layout, hidden, vision).onnx_model()
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def onnx_select(method: str, x: dict, keep: int, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    _, n, hidden = x["image_features"].shape
    vision = x["vision_features"].shape[-1] if "vision_features" in x else VISION
    sess = _session(method, n, hidden, vision, tuple(sorted((params or {}).items())))
    gh, gw = grid_for(n)
    feeds = dict(x, keep=np.array(keep, dtype=np.int64), grid_h=np.array(gh), grid_w=np.array(gw))
    idx, sel = sess.run(["kept_indices", "selected_features"], {i.name: feeds[i.name] for i in sess.get_inputs()})
    return idx, sel


# --- registry -----------------------------------------------------------------------------------
def test_registry_has_tops_and_every_baseline():
    assert set(selector.available()) == {"tops", "dpp-merge", "cdpruner", "divprune", "attention", "uniform", "random",
                                         "fastv", "pdrop", "topv", "none"}
    assert {m for m in selector.available() if selector.get(m).stage == "llm"} == {"fastv", "pdrop", "topv"}
    assert selector.get("tops").stage == "both" and selector.get("tops").merge == "none"
    assert selector.get("topv").merge == "none"
    assert selector.get("dpp-merge").merge == "mean"
    assert all(selector.get(m).stage == "vision" for m in selector.available()
               if m not in ("fastv", "pdrop", "topv", "tops"))
    with pytest.raises(InputError, match="unknown selector"):
        selector.get("nope")
    with pytest.raises(InputError, match="no parameter 'gamma'"):
        selector.get("dpp-merge").resolve_params({"gamma": 1.0})


@pytest.mark.parametrize("keep", [0, -1, 577, 2.5, True])
def test_check_keep_refuses_out_of_range_or_non_integer(keep):
    with pytest.raises(InputError):
        selector.check_keep(keep, 576)


def decided_without_ties(method: str, x: dict, keep: int, params: dict | None = None) -> bool:
    """True when no step is decided by the tie rule: the tolerant and an exact argmax pick the same
    tokens, on the input and on the same tokens in reverse order (which flips any exact tie)."""
    from tops_edge.selector import dpp

    n = x["image_features"].shape[1]
    rev = permute_tokens(x, np.arange(n)[::-1])
    picks = []
    for tol in (dpp.TIE_TOL, 0.0):
        saved, dpp.TIE_TOL = dpp.TIE_TOL, tol
        try:
            picks.append(set(reference(method, x, keep, params)[0].tolist()))
            picks.append({n - 1 - i for i in reference(method, rev, keep, params)[0].tolist()})
        finally:
            dpp.TIE_TOL = saved
    return all(p == picks[0] for p in picks)


# --- invariants as properties, on the torch reference and the ONNX form -------------------------
cases = st.tuples(st.integers(2, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("method", PRUNING)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_k_distinct_ascending_in_range_and_deterministic(method, case):
    n, k, seed = case
    k = min(k, n)
    x = make_inputs(np.random.default_rng(seed), 2, n)
    for idx in (reference(method, x, k), onnx_select(method, x, k)[0]):
        assert idx.shape == (2, k)
        for row in idx:
            assert list(row) == sorted(set(row.tolist())) and 0 <= row[0] and row[-1] < n
    assert np.array_equal(reference(method, x, k), reference(method, x, k))
    assert np.array_equal(onnx_select(method, x, k)[0], onnx_select(method, x, k)[0])


@pytest.mark.parametrize("method", PRUNING)
@pytest.mark.parametrize("n", [1, 7, 36])
def test_keep_at_least_n_is_the_identity(method, n):
    x = make_inputs(np.random.default_rng(n), 2, n)
    for k in (n, n + 5):
        assert np.array_equal(reference(method, x, k), np.tile(np.arange(n), (2, 1)))
        idx, sel = onnx_select(method, x, k)
        assert np.array_equal(idx, np.tile(np.arange(n), (2, 1)))
        assert np.array_equal(sel, x["image_features"], equal_nan=True)


@pytest.mark.parametrize("method", CONTENT_BASED)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_degenerate_tokens_are_never_chosen_over_finite_ones(method, case):
    n, k, seed = case
    rng = np.random.default_rng(seed)
    bad = int(rng.integers(1, n)) if n > 1 else 0
    x = make_inputs(rng, 1, n, degenerate=bad)
    f = x["vision_features"] if method in ("dpp-merge", "cdpruner") else x["image_features"]
    finite = np.isfinite(x["image_features"]).all(-1) & (np.abs(x["image_features"]).sum(-1) > 0)
    finite &= np.isfinite(f).all(-1) & (np.abs(f).sum(-1) > 0)
    if method == "attention":
        finite = np.isfinite(x["cls_attention"])
    if method in IN_LLM:
        finite = np.isfinite(x["text_attention"][:, -1])
    k = min(k, int(finite.sum())) or 1
    for idx in (reference(method, x, k), onnx_select(method, x, k)[0]):
        if finite.sum():
            assert finite[0, idx[0]].all()


@pytest.mark.parametrize("method", CONTENT_BASED)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_permuting_tokens_permutes_the_chosen_set(method, case):
    """Content-only selection. TOPS's spatial factor ties a token to its grid position (as `uniform`
    is), so the property holds for TOPS with it off; test_spatial_* cover the factor."""
    n, k, seed = case
    params = {"spatial": 0.0} if method == "dpp-merge" else None
    rng = np.random.default_rng(seed)
    k = min(k, n)
    x = make_inputs(rng, 1, n)
    perm = rng.permutation(n)
    px = permute_tokens(x, perm)
    # ties (scores within TIE_TOL) go to the lowest index, which no permutation preserves: the
    # property is about inputs where no step is decided by the tie rule (e.g. DivPrune's first pick
    # always ties for a mutual-nearest pair)
    assume(decided_without_ties(method, x, k, params) and decided_without_ties(method, px, k, params))
    chosen = set(reference(method, x, k, params)[0].tolist())
    assert {int(perm[i]) for i in reference(method, px, k, params)[0]} == chosen


@pytest.mark.parametrize("method", PRUNING)
def test_batch_gives_what_each_item_gives_alone(method):
    x = make_inputs(np.random.default_rng(5), 3, 25, duplicates=2, degenerate=2)
    batched_ref, batched_onnx = reference(method, x, 9), onnx_select(method, x, 9)[0]
    for b in range(3):
        one = {key: v[b : b + 1] for key, v in x.items()}
        assert np.array_equal(reference(method, one, 9)[0], batched_ref[b])
        assert np.array_equal(onnx_select(method, one, 9)[0][0], batched_onnx[b])


# --- ONNX form == torch reference ----------------------------------------------------------------
@pytest.mark.parametrize("method", EXACT)
def test_onnx_form_returns_the_reference_indices_on_200_random_cases(method):
    rng = np.random.default_rng(sum(map(ord, method)))
    for case in range(200):
        n = int(rng.integers(2, 65))
        k = int(rng.integers(1, n + 1))
        x = make_inputs(rng, int(rng.integers(1, 3)), n, duplicates=int(rng.integers(0, 4)), degenerate=int(rng.integers(0, 3)))
        idx, sel = onnx_select(method, x, k)
        ref = reference(method, x, k)
        assert np.array_equal(idx, ref), f"case {case}: n={n} k={k}"
        gathered = np.take_along_axis(x["image_features"], ref[..., None], axis=1)
        assert np.array_equal(sel, gathered, equal_nan=True)


def test_onnx_forms_agree_at_llava_shapes():
    """N = 576 tokens, the grids and budgets the product uses."""
    rng = np.random.default_rng(0)
    x = {
        "image_features": rng.standard_normal((1, 576, 64)).astype(np.float32),
        "vision_features": rng.standard_normal((1, 576, 32)).astype(np.float32),
        "instruction_embeds": rng.standard_normal((1, 9, 64)).astype(np.float32),
        "instruction_mask": np.ones((1, 9), np.int64),
        "cls_attention": rng.random((1, 576)).astype(np.float32),
        "text_attention": rng.random((1, 5, 576)).astype(np.float32),
    }
    for method, k in itertools.product(EXACT, (64, 128)):
        assert np.array_equal(onnx_select(method, x, k)[0], reference(method, x, k)), (method, k)


# --- the in-LLM methods (fastv, pdrop) at a decoder cut ------------------------------------------
def test_in_llm_graphs_take_the_alive_tokens_and_the_text_attention():
    for method in IN_LLM:
        info = selector.get(method)
        assert info.extra_inputs(info.resolve_params()) == ("text_attention",)
        model = in_llm_graph(method, info.resolve_params(), "alive", HIDDEN)
        assert [i.name for i in model.graph.input] == ["image_features", "keep", "text_attention"]
        assert [o.name for o in model.graph.output] == ["kept_indices", "selected_features"]
        assert {n.domain for n in model.graph.node} <= {""}  # standard ops only


def by_last_row(last_row, rows: int = QUERY, n_hidden: int = HIDDEN, seed: int = 0) -> dict:
    """One image whose text_attention's last row is `last_row` (the others random)."""
    rng = np.random.default_rng(seed)
    n = len(last_row)
    attention = rng.random((1, rows, n)).astype(np.float32)
    attention[0, -1] = last_row
    return {"image_features": rng.standard_normal((1, n, n_hidden)).astype(np.float32), "text_attention": attention}


@pytest.mark.parametrize("method", IN_LLM)
def test_in_llm_methods_keep_the_top_k_of_the_last_prompt_tokens_attention(method):
    nan, inf = np.nan, np.inf
    row = np.array([0.1, 0.5, 0.3, 0.5, nan, inf, 0.2, -inf], np.float32)
    expected = {1: [1], 2: [1, 3], 3: [1, 2, 3], 5: [0, 1, 2, 3, 6], 6: [0, 1, 2, 3, 4, 6]}  # ties: lowest index;
    for k, kept in expected.items():  # non-finite (NaN, +inf, -inf) rank last, among themselves by index
        x = by_last_row(row)
        assert reference(method, x, k).tolist() == [kept]
        idx, sel = onnx_select(method, x, k)
        assert idx.tolist() == [kept]
        np.testing.assert_array_equal(sel[0], x["image_features"][0, kept])


@pytest.mark.parametrize("method", IN_LLM)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_last_row_keeps_the_first_k_and_other_rows_are_never_read(method, bad):
    x = by_last_row(np.full(9, bad, np.float32))
    for select in (lambda y: reference(method, y, 4), lambda y: onnx_select(method, y, 4)[0]):
        assert select(x).tolist() == [[0, 1, 2, 3]]
    y = make_inputs(np.random.default_rng(1), 2, 30)
    changed = dict(y, text_attention=y["text_attention"].copy())
    changed["text_attention"][:, :-1] = np.random.default_rng(2).random((2, QUERY - 1, 30))
    changed["text_attention"][0, 0] = bad
    for select in (lambda z: reference(method, z, 7), lambda z: onnx_select(method, z, 7)[0]):
        assert np.array_equal(select(y), select(changed))
    flipped = dict(y, text_attention=y["text_attention"].copy())
    flipped["text_attention"][:, -1] = 1 - flipped["text_attention"][:, -1]
    assert not np.array_equal(reference(method, y, 7), reference(method, flipped, 7))


def test_fastv_and_pdrop_select_alike_at_a_cut_and_differ_in_schedule_only():
    x = make_inputs(np.random.default_rng(6), 3, 40, duplicates=3, degenerate=2)
    for k in (1, 9, 39):
        assert np.array_equal(reference("fastv", x, k), reference("pdrop", x, k))
        assert np.array_equal(onnx_select("fastv", x, k)[0], onnx_select("pdrop", x, k)[0])


@pytest.mark.parametrize("method, params", [("fastv", {"layer": 0}), ("fastv", {"layer": -3}),
                                            ("pdrop", {"layers": "8,x"}), ("pdrop", {"layers": "16,8"}),
                                            ("pdrop", {"layers": "0,8"})])
def test_in_llm_parameters_are_checked_before_any_export_work(method, params):
    info = selector.get(method)
    with pytest.raises(InputError, match="layer"):
        info.extra_inputs(info.resolve_params(params))


# --- the DPP methods' semantics ------------------------------------------------------------------
def logdet_greedy(kernel: np.ndarray, keep: int) -> list[int]:
    """Greedy MAP by recomputing log det L[S] from scratch for every candidate (float64)."""
    chosen: list[int] = []
    for _ in range(keep):
        best, best_val = None, -np.inf
        for i in range(len(kernel)):
            if i in chosen:
                continue
            idx = chosen + [i]
            sign, val = np.linalg.slogdet(kernel[np.ix_(idx, idx)])
            if sign > 0 and val > best_val:
                best, best_val = i, val
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", range(10))
def test_cdpruner_equals_greedy_on_log_det_recomputed_from_scratch(seed):
    rng = np.random.default_rng(seed)
    n, k = 24, 10
    x = make_inputs(rng, 1, n)
    p = selector.get("cdpruner").resolve_params()
    v, valid = sanitize(torch.from_numpy(x["image_features"]))
    f, _ = sanitize(torch.from_numpy(x["vision_features"]))
    r = relevance(v, valid, torch.from_numpy(x["instruction_embeds"]), torch.from_numpy(x["instruction_mask"]), p["relevance_sign"])
    kernel = conditional_kernel(f, torch.exp(p["alpha"] * r))
    order = greedy(kernel, valid, k, beta=0.0)[0].tolist()
    assert order == logdet_greedy(kernel[0].double().numpy(), k)
    assert sorted(order) == reference("cdpruner", x, k)[0].tolist()


def test_tops_with_beta_zero_equals_cdpruner():
    rng = np.random.default_rng(3)
    cd = selector.get("cdpruner").resolve_params()
    same = {"beta": 0.0, "alpha": cd["alpha"], "relevance_sign": cd["relevance_sign"], "similarity": cd["similarity"],
            "spatial": cd["spatial"]}
    for _ in range(20):
        x = make_inputs(rng, 2, 49)
        assert np.array_equal(reference("dpp-merge", x, 12, same), reference("cdpruner", x, 12))
        assert np.array_equal(onnx_select("dpp-merge", x, 12, same)[0], onnx_select("cdpruner", x, 12)[0])


def test_coverage_term_changes_the_selection():
    x = make_inputs(np.random.default_rng(4), 1, 64)
    picks = {beta: reference("dpp-merge", x, 16, {"beta": beta, "spatial": 0.0})[0].tolist() for beta in (0.0, 0.5, 0.9)}
    assert picks[0.0] != picks[0.5] != picks[0.9]


def low_rank_inputs(side: int = 12, seed: int = 0) -> dict:
    """Image-like tokens (feature_fixtures.image_like_tokens) and a random instruction."""
    image, vision = image_like_tokens(side, seed, hidden=HIDDEN, width=VISION)
    x = make_inputs(np.random.default_rng(seed), 1, side * side)
    x["image_features"], x["vision_features"] = image, vision
    return x


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("spatial", [0.0, 1.0])
def test_low_rank_features_still_give_k_distinct_tokens_and_the_onnx_form_agrees(beta, spatial):
    """Regression: once an image's near-low-rank kernel was exhausted, the coverage term's running c_i
    rounded below 0, its log was NaN and every later step picked token 0 again (K indices, not K
    distinct ones: seen on the ShapesVQA model's real features)."""
    params = {"beta": beta, "spatial": spatial}
    for seed in range(3):
        x = low_rank_inputs(seed=seed)
        for k in (8, 40, 100):
            ref = reference("dpp-merge", x, k, params)[0]
            got = onnx_select("dpp-merge", x, k, params)[0][0]
            for kept in (ref, got):
                assert len(set(kept.tolist())) == k and np.all(np.diff(kept) > 0)
            if spatial:  # full rank: every step is decided by a real gain, so both forms agree
                assert np.array_equal(got, ref)
            # without it, past the kernel's rank whether a token's residual is under the exhaustion
            # floor is decided by the last bits of two different GEMMs, so the forms may differ there


def test_spatial_factor_spreads_the_tokens_a_plain_background_cannot_tell_apart():
    """On an image-like background the kernel without the spatial factor runs out of rank and falls
    back to the lowest indices: most of K = 40 land in the top third of the 12x12 grid. With it every
    third of the image keeps between a quarter and a half of them."""
    for seed in range(3):
        x = low_rank_inputs(seed=seed)
        thirds = {}
        for spatial in (0.0, 1.0):
            rows = reference("dpp-merge", x, 40, {"spatial": spatial})[0] // 12
            thirds[spatial] = np.bincount(rows // 4, minlength=3)
        assert thirds[0.0][0] > 0.6 * 40
        assert all(10 <= t <= 20 for t in thirds[1.0]), thirds[1.0]


def test_spatial_factor_is_a_gaussian_of_grid_distance_with_the_lattice_spacing():
    from tops_edge.selector.dpp import spatial_factor

    g = spatial_factor(576, (24, 24), 64, 1.0)  # sigma = sqrt(576 / 64) = 3 patches
    assert g.shape == (576, 576) and torch.all(torch.diagonal(g) == 1)
    assert torch.allclose(g[0, 3], torch.tensor(np.exp(-0.5), dtype=torch.float32))  # 3 columns apart
    assert torch.allclose(g[0, 24 * 3 + 3], torch.tensor(np.exp(-1.0), dtype=torch.float32))  # (3, 3) apart
    assert torch.linalg.eigvalsh(g.double()).min() > -1e-6  # PSD: S * G stays a valid DPP kernel


@pytest.mark.parametrize("method, aware", [("dpp-merge", True), ("cdpruner", True), ("divprune", False), ("uniform", False)])
def test_only_instruction_aware_methods_change_with_the_instruction(method, aware):
    rng = np.random.default_rng(8)
    x = make_inputs(rng, 1, 64)
    # tokens near two different directions, and two instructions pointing at either direction
    a, b = rng.standard_normal(HIDDEN), rng.standard_normal(HIDDEN)
    x["image_features"][0, :32] += 3 * a.astype(np.float32)
    x["image_features"][0, 32:] += 3 * b.astype(np.float32)
    x["instruction_mask"][:] = 1
    first = dict(x, instruction_embeds=np.tile(a, (1, TEXT, 1)).astype(np.float32))
    second = dict(x, instruction_embeds=np.tile(b, (1, TEXT, 1)).astype(np.float32))
    for select in (lambda y: reference(method, y, 12), lambda y: onnx_select(method, y, 12)[0]):
        assert (select(first).tolist() != select(second).tolist()) == aware


def test_uniform_64_of_24x24_is_an_8x8_lattice():
    idx = UniformGrid(24, 24).indices(torch.tensor(64)).view(8, 8)
    rows, cols = idx // 24, idx % 24
    assert (rows == rows[:, :1]).all() and (cols == cols[:1, :]).all()
    assert rows[:, 0].tolist() == cols[0].tolist() == [1, 4, 7, 10, 13, 16, 19, 22]


def test_random_depends_on_the_seed_only():
    x = make_inputs(np.random.default_rng(0), 1, 100)
    y = make_inputs(np.random.default_rng(1), 1, 100)
    assert np.array_equal(reference("random", x, 10, {"seed": 3}), reference("random", y, 10, {"seed": 3}))
    assert not np.array_equal(reference("random", x, 10, {"seed": 3}), reference("random", x, 10, {"seed": 4}))
    assert np.array_equal(onnx_select("random", x, 10, {"seed": 4})[0], reference("random", x, 10, {"seed": 4}))


def test_merge_dropped_groups_every_token_with_its_most_similar_kept_one():
    from tops_edge.selector.merge import merge_dropped

    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 8)).astype(np.float32)
    kept = np.array([2, 7, 19, 33])
    merged, sizes = merge_dropped(features, kept)
    assert merged.shape == (4, 8) and sizes.dtype == np.int64
    assert sizes.sum() == 40 and (sizes >= 1).all()
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    owner = np.argmax(unit @ unit[kept].T, axis=1)
    owner[kept] = np.arange(4)  # a kept token is in its own group even if another is closer
    for j in range(4):
        np.testing.assert_allclose(merged[j], features[owner == j].mean(axis=0), rtol=1e-5, atol=1e-6)
        assert sizes[j] == (owner == j).sum()
    # nothing dropped: every group is the token itself
    merged_all, sizes_all = merge_dropped(features, np.arange(40))
    np.testing.assert_array_equal(merged_all, features)
    assert (sizes_all == 1).all()


@pytest.mark.parametrize("method", ["dpp-merge", "cdpruner", "divprune", "attention", "uniform", "random"])
def test_every_selector_graph_merges_as_the_numpy_reference(method):
    """The merge tail of each exported selector graph (merged_features, kept_sizes, token_groups)
    equals merge_dropped / merge_groups on the graph's own selection, at several budgets, duplicate
    tokens included."""
    from tops_edge.selector.merge import merge_dropped, merge_groups

    rng = np.random.default_rng(7)
    x = {"image_features": rng.standard_normal((1, 64, 16), dtype=np.float32),
         "vision_features": rng.standard_normal((1, 64, 8), dtype=np.float32),
         "instruction_embeds": rng.standard_normal((1, 5, 16), dtype=np.float32),
         "instruction_mask": np.ones((1, 5), np.int64),
         "cls_attention": rng.random((1, 64), dtype=np.float32)}
    x["image_features"][0, 10] = x["image_features"][0, 3]  # a duplicate: ties go to the first kept
    sess = _session(method, 64, 16, 8, ())
    gh, gw = grid_for(64)
    for keep in (1, 7, 32, 64):
        feeds = dict(x, keep=np.array(keep, dtype=np.int64), grid_h=np.array(gh), grid_w=np.array(gw))
        kept, merged, sizes, groups = sess.run(["kept_indices", "merged_features", "kept_sizes", "token_groups"],
                                               {i.name: feeds[i.name] for i in sess.get_inputs()})
        ref_merged, ref_sizes = merge_dropped(x["image_features"][0], kept[0])
        assert sizes.dtype == np.int64 and sizes.sum() == 64
        np.testing.assert_array_equal(sizes[0], ref_sizes)
        np.testing.assert_array_equal(groups[0], merge_groups(x["image_features"][0], kept[0]))
        np.testing.assert_array_equal(np.bincount(groups[0], minlength=keep), sizes[0])
        np.testing.assert_allclose(merged[0], ref_merged, rtol=1e-5, atol=1e-5)
