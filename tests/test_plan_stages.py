"""The pruning plan (selector/plan.py): --keep T, the equivalent average visual tokens, as stage budgets.

Hand computations (N visual tokens, L decoder layers, a cut at c: layers 0..c-1 see N):
  fastv  N = 576, L = 32, c = 2, T = 64:  K = (64*32 - 2*576) / 30 = 896 / 30 = 29.87 -> 30;
         average (2*576 + 30*30) / 32 = 2052 / 32 = 64.125. T = 128 -> 2944/30 = 98.13 -> 98;
         T = 192 -> 4992/30 = 166.4 -> 166 (average 6132/32 = 191.625).
         Smallest: K = 1, (2*576 + 30) / 32 = 36.94 -> T >= 37. On L = 4: (1152 + 2) / 4 = 288.5 -> 289.
  pdrop  N = 576, L = 32, cuts 8, 16, 24: T = 270 is the paper's lambda = 0.5, budgets 288, 144, 72:
         (8*576 + 8*(288 + 144 + 72)) / 32 = 8640 / 32 = 270.
         Smallest: the last budget 576 lambda^3 must round to >= 1, lambda >= (1/1152)^(1/3) = 0.0954:
         budgets 55, 5, 1, (4608 + 8*61) / 32 = 159.25 -> T >= 160 (which 57, 6, 1 averages exactly).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tops_edge import selector
from tops_edge.errors import InputError
from tops_edge.selector.plan import (PruningPlan, Stage, cut_layers, geometric_budgets, plan_for, quarter_layers,
                                     stage_layers)

SMALLEST = re.compile(r"the smallest it reaches is (\d+);")


def budgets(plan: PruningPlan) -> list[int]:
    return [s.keep for s in plan.stages]


# --- pre-LLM methods and no pruning ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["dpp-merge", "cdpruner", "divprune", "attention", "uniform", "random"])
def test_a_pre_llm_method_is_one_stage_before_the_llm_keeping_t(method):
    plan = plan_for(method, {}, 64, 576, 32)
    assert plan.stages == (Stage(layer=0, method=method, keep=64),)
    assert [plan.tokens_at(layer) for layer in range(32)] == [64] * 32
    assert plan.average_tokens() == 64.0 and plan.cuts() == ()
    assert selector.get(method).stage == "vision" and cut_layers(method, None, 32) == ()


@pytest.mark.parametrize("method", ["dpp-merge", "fastv", "pdrop", "none"])
@pytest.mark.parametrize("average", [576, 600])
def test_t_at_least_n_is_a_plan_with_no_stages(method, average):
    plan = plan_for(method, None, average, 576, 32)
    assert plan.stages == () and plan.cuts() == () and plan.average_tokens() == 576.0
    assert all(plan.tokens_at(layer) == 576 for layer in range(32))


def test_none_never_prunes():
    assert plan_for("none", {}, 64, 576, 32).stages == ()


@pytest.mark.parametrize("average", [0, -5, 2.5, True, "64"])
def test_t_must_be_a_whole_number_at_least_one(average):
    with pytest.raises(InputError, match="--keep"):
        plan_for("fastv", {}, average, 576, 32)


# --- fastv ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("average, keep, total", [(64, 30, 2052), (128, 98, 1152 + 30 * 98), (192, 166, 6132)])
def test_fastv_on_llava_1_5_by_hand(average, keep, total):
    plan = plan_for("fastv", {}, average, 576, 32)
    assert plan.stages == (Stage(layer=2, method="fastv", keep=keep),)
    assert [plan.tokens_at(layer) for layer in range(32)] == [576, 576] + [keep] * 30
    assert plan.average_tokens() == total / 32 and abs(plan.average_tokens() - average) < 0.5
    assert plan.cuts() == (2,) and cut_layers("fastv", {}, 32) == (2,)


def test_fastv_rounds_k_to_the_nearest_and_a_half_up():
    # N = 9, L = 5, cut 3: K = (5T - 27) / 2; T = 8 -> 6.5: K = 6 or 7 both average 0.2 from 8 -> 7
    assert budgets(plan_for("fastv", {"layer": 3}, 8, 9, 5)) == [7]
    assert plan_for("fastv", {"layer": 3}, 8, 9, 5).average_tokens() == (27 + 2 * 7) / 5
    # T = 7 -> K = 4 exactly; N = 10, L = 5, cut 2: K = (5T - 20) / 3, T = 5 -> 1.67 -> 2
    assert budgets(plan_for("fastv", {"layer": 3}, 7, 9, 5)) == [4]
    assert budgets(plan_for("fastv", {"layer": 2}, 5, 10, 5)) == [2]


def test_fastv_below_its_smallest_average_names_it_in_one_line():
    with pytest.raises(InputError) as e:
        plan_for("fastv", {}, 64, 576, 4)
    assert str(e.value) == ("fastv at layer 2 of a 4-layer model cannot average 64 of 576 visual tokens: the smallest "
                            "it reaches is 289; lower the cut layer or raise --keep")
    assert budgets(plan_for("fastv", {}, 289, 576, 4)) == [2]  # (1152 + 2*2) / 4 = 289
    with pytest.raises(InputError, match="smallest it reaches is 289;"):
        plan_for("fastv", {}, 288, 576, 4)
    # LLaVA-1.5: 37 is K = 1, 36 is out of reach
    assert budgets(plan_for("fastv", {}, 37, 576, 32)) == [1]
    with pytest.raises(InputError, match="smallest it reaches is 37;"):
        plan_for("fastv", {}, 36, 576, 32)
    # a lower cut reaches lower
    assert budgets(plan_for("fastv", {"layer": 1}, 36, 576, 32)) == [19]  # (36*32 - 576) / 31 = 18.58


@pytest.mark.parametrize("layer", [0, 32, 40, -1])
def test_fastv_cut_must_be_inside_the_decoder(layer):
    with pytest.raises(InputError, match=r"1\.\.31 of a 32-layer model"):
        plan_for("fastv", {"layer": layer}, 64, 576, 32)
    assert cut_layers("fastv", {"layer": 31}, 32) == (31,)


def test_a_one_layer_model_has_no_cut():
    for method in ("fastv", "pdrop"):
        with pytest.raises(InputError, match="1-layer model has none"):
            plan_for(method, {}, 10, 576, 1)
    assert plan_for("dpp-merge", {}, 10, 576, 1).stages == (Stage(0, "dpp-merge", 10),)


# --- pdrop ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers, cuts", [(32, (8, 16, 24)), (8, (2, 4, 6)), (40, (10, 20, 30)), (28, (7, 14, 21)),
                                              (4, (1, 2, 3)), (6, (2, 3, 5)), (3, (1, 2)), (2, (1,))])
def test_pdrop_cuts_at_the_quarters_of_the_depth(num_layers, cuts):
    assert quarter_layers(num_layers) == cuts
    assert cut_layers("pdrop", None, num_layers) == cuts == stage_layers("pdrop", {"layers": ""}, num_layers)


def test_pdrop_at_270_of_576_is_the_papers_halving():
    plan = plan_for("pdrop", {}, 270, 576, 32)
    assert plan.stages == tuple(Stage(c, "pdrop", k) for c, k in ((8, 288), (16, 144), (24, 72)))
    assert plan.average_tokens() == 270.0 and plan.cuts() == (8, 16, 24)
    assert [plan.tokens_at(layer) for layer in (0, 7, 8, 15, 16, 23, 24, 31)] == [576, 576, 288, 288, 144, 144, 72, 72]


@pytest.mark.parametrize("average", [160, 192, 200, 300, 400, 500, 574, 575])
def test_pdrop_budgets_are_geometric_strictly_decreasing_and_average_to_t(average):
    plan = plan_for("pdrop", {}, average, 576, 32)
    keep = budgets(plan)
    assert len(keep) == 3 and all(a > b >= 1 for a, b in zip([576] + keep, keep))
    assert abs(plan.average_tokens() - average) <= 0.5
    assert sum(plan.tokens_at(layer) for layer in range(32)) == plan.average_tokens() * 32
    assert tuple(keep) in _every_geometric_plan(576, 3)  # N lambda^s rounded for one lambda


def test_pdrop_below_its_smallest_average_names_it_in_one_line():
    with pytest.raises(InputError) as e:
        plan_for("pdrop", {}, 64, 576, 32)
    assert str(e.value) == ("pdrop at layers 8, 16, 24 of a 32-layer model cannot average 64 of 576 visual tokens: the "
                            "smallest it reaches is 160; lower the cut layers or raise --keep")
    assert budgets(plan_for("pdrop", {}, 160, 576, 32)) == [57, 6, 1]  # lambda ~ 0.099: (4608 + 8*64) / 32 = 160
    with pytest.raises(InputError, match="smallest it reaches is 160;"):
        plan_for("pdrop", {}, 159, 576, 32)
    # earlier cuts reach LLaVA-1.5's usual budgets
    plan = plan_for("pdrop", {"layers": "2,8,16"}, 64, 576, 32)
    assert plan.cuts() == (2, 8, 16) and abs(plan.average_tokens() - 64) <= 0.5


def test_pdrop_with_more_stages_than_tokens_to_drop_cannot_prune():
    with pytest.raises(InputError, match="cannot prune 3 visual tokens: each of its 3 stages drops at least one") as e:
        plan_for("pdrop", {}, 2, 3, 8)
    assert "\n" not in str(e.value)
    assert budgets(plan_for("pdrop", {}, 3, 4, 4)) == [3, 2, 1]  # the only plan: (4 + 3 + 2 + 1) / 4 = 2.5
    with pytest.raises(InputError, match="smallest it reaches is 3;"):
        plan_for("pdrop", {}, 2, 4, 4)


@pytest.mark.parametrize("layers", ["0,8", "8,32", "8,8,16", "16,8", "a,b", "8;16"])
def test_pdrop_layers_must_be_ascending_cuts_inside_the_decoder(layers):
    with pytest.raises(InputError, match="layers"):
        plan_for("pdrop", {"layers": layers}, 200, 576, 32)


def test_pdrop_takes_its_own_list_spelling():
    assert cut_layers("pdrop", {"layers": "[8, 16, 24]"}, 32) == (8, 16, 24) == cut_layers("pdrop", {"layers": "8,16,24"}, 32)


def test_pdrop_with_one_cut_is_fastv_at_that_cut():
    for average in (37, 64, 100, 128, 192, 300, 575):
        assert budgets(plan_for("pdrop", {"layers": "2"}, average, 576, 32)) == budgets(plan_for("fastv", {}, average, 576, 32))


# --- the plan's own checks ------------------------------------------------------------------------
@pytest.mark.parametrize("stages, match", [
    ((Stage(8, "pdrop", 100), Stage(4, "pdrop", 50)), "ascending"),
    ((Stage(4, "pdrop", 100), Stage(8, "pdrop", 100)), "strictly fewer"),
    ((Stage(2, "fastv", 600),), "only 576 are alive"),
    ((Stage(32, "fastv", 10),), r"1\.\.31"),
    ((Stage(2, "fastv", 0),), ">= 1"),
])
def test_an_invalid_plan_is_refused(stages, match):
    with pytest.raises(InputError, match=match):
        PruningPlan(stages, 576, 32)


def test_the_runtime_checks_a_plan_against_the_tokens_an_image_has():
    plan = plan_for("pdrop", {}, 270, 576, 32)
    assert plan.check(576) is plan and plan.check(2880) is plan
    with pytest.raises(InputError, match="keeps 288 visual tokens, but only 200 are alive there"):
        plan.check(200)
    with pytest.raises(InputError, match=r"0\.\.31"):
        plan.tokens_at(32)


# --- properties over (N, L, T) --------------------------------------------------------------------
def _feasible_or_explained(method, params, average, n, layers):
    try:
        return plan_for(method, params, average, n, layers)
    except InputError as e:
        message = str(e)
        assert "\n" not in message
        found = SMALLEST.search(message)
        if found is None:  # pdrop with more stages than tokens to drop
            assert "cannot prune" in message and n <= len(cut_layers(method, params, layers))
            return None
        smallest = int(found.group(1))
        assert average < smallest <= n  # = n: no cut there can prune at all (e.g. N = 2)
        _check_plan(plan_for(method, params, smallest, n, layers), smallest, n, layers)  # the smallest named is reached
        if smallest > 1:
            with pytest.raises(InputError):
                plan_for(method, params, smallest - 1, n, layers)
        return None


def _check_plan(plan, average, n, layers):
    keep = budgets(plan)
    assert all(a > b >= 1 for a, b in zip([n] + keep, keep))
    tokens = [plan.tokens_at(layer) for layer in range(layers)]
    assert all(a >= b for a, b in zip(tokens, tokens[1:])) and tokens[0] <= n
    assert plan.average_tokens() == sum(tokens) / layers
    assert all(1 <= c <= layers - 1 for c in plan.cuts())
    if average < n:
        assert abs(plan.average_tokens() - average) <= 1, (plan, average)
    else:
        assert plan.stages == ()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3000), layers=st.integers(2, 80), fraction=st.floats(0, 1.05), cut=st.floats(0, 1))
def test_a_feasible_fastv_plan_averages_within_one_token_of_t(n, layers, fraction, cut):
    average = max(1, round(fraction * n))
    params = {"layer": 1 + int(cut * (layers - 2))}
    plan = _feasible_or_explained("fastv", params, average, n, layers)
    if plan is not None:
        _check_plan(plan, average, n, layers)
        assert plan.cuts() in ((), (params["layer"],))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3000), layers=st.integers(2, 80), fraction=st.floats(0, 1.05))
def test_a_feasible_pdrop_plan_averages_within_one_token_of_t(n, layers, fraction):
    average = max(1, round(fraction * n))
    plan = _feasible_or_explained("pdrop", {}, average, n, layers)
    if plan is not None:
        _check_plan(plan, average, n, layers)
        assert plan.cuts() in ((), quarter_layers(layers))


def _every_geometric_plan(n, stages):
    """Every distinct budget vector of geometric_budgets over ratio in (0, 1]: they change only where
    some N ratio^s crosses k + 1/2, so one ratio between each two neighbouring crossings is enough."""
    crossings = sorted({((k + 0.5) / n) ** (1 / s) for s in range(1, stages + 1) for k in range(n)} | {1.0})
    ratios = [crossings[0] / 2] + [(a + b) / 2 for a, b in zip(crossings, crossings[1:])] + crossings
    return {geometric_budgets(n, stages, r) for r in ratios}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 120), layers=st.integers(4, 40), fraction=st.floats(0, 1))
def test_pdrop_picks_the_geometric_plan_closest_to_t(n, layers, fraction):
    """Against every plan of the family, enumerated: the bisection finds the closest average."""
    average = max(1, round(fraction * n))
    plan = _feasible_or_explained("pdrop", {}, average, n, layers)
    if plan is None or not plan.stages:
        return
    cuts = plan.cuts()
    best = min(abs(PruningPlan(tuple(Stage(c, "pdrop", k) for c, k in zip(cuts, keep)), n, layers).average_tokens() - average)
               for keep in _every_geometric_plan(n, len(cuts)) if keep[-1] >= 1)
    assert abs(plan.average_tokens() - average) == pytest.approx(best, abs=1e-12)
