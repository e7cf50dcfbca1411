"""The paper's TOPS as the registry's `tops` (selector/methods.py, plan.TOPS): its schedule (Stage I
at 2T, Stage II at 3/8 L and 3/4 L), the published Stage II lam per budget, the ablation switches,
the registered graphs against their references, and a 32-layer-shaped model exported with
`--selector tops --keep 64`: three stages, instruction-aware Stage II, and the exported pipeline equal
to HF's own decoder layers fed the same kept sets."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cli_helpers import EXAMPLE, one_line_error
from hf_reference import hf_cut_greedy, hf_pruned_inputs_embeds
from test_segments import _keep_rows, _prompt_rows
from test_selector import HIDDEN, VISION, make_inputs
from test_tops_paper import cut_inputs
from tops_edge import selector as registry
from tops_edge.errors import InputError
from tops_edge.selector import tops_paper as T
from tops_edge.selector.parts import selector_part
from tops_edge.selector.plan import plan_for

NEW_TOKENS = 6
PROMPTS = ("What shapes are in the picture?", "Is the red circle above the blue square?")


# --- the schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, keep, expected", [
    (32, 64, [(0, 128), (12, 32), (24, 16)]),   # the paper's 7B: 2T -> T/2 -> T/4
    (32, 128, [(0, 256), (12, 64), (24, 32)]),
    (32, 32, [(0, 64), (12, 16), (24, 8)]),
    (40, 64, [(0, 128), (15, 32), (30, 16)]),   # 13B: L15 / L30
    (8, 64, [(0, 128), (3, 32), (6, 16)]),
])
def test_tops_keeps_2t_then_half_then_a_quarter_at_three_eighths_and_three_quarters(layers, keep, expected):
    plan = plan_for("tops", {}, keep, 576, layers)
    assert [(s.layer, s.keep) for s in plan.stages] == expected
    assert plan.average_tokens() == keep  # T equivalent average tokens, exactly


def test_the_average_is_t_up_to_rounding_on_other_depths_and_cuts():
    """The T/2 rule where it fits (the last cut then makes the average T up to one budget's rounding);
    geometric Stage II budgets from 2T where it does not (12 layers, cuts 2,14 of 32)."""
    for layers in (12, 20, 28, 30, 32):
        for keep in (32, 64, 100, 128):
            for params in ({}, {"layers": "2,14"} if layers == 32 else {}):
                plan = plan_for("tops", params, keep, 576, layers)
                keeps = [s.keep for s in plan.stages]
                assert keeps[0] == 2 * keep and keeps == sorted(set(keeps), reverse=True)
                last = plan.stages[-1]
                assert abs(plan.average_tokens() - keep) <= (layers - plan.stages[1].layer) / (2 * layers)
                if not params and layers >= 20:
                    assert keeps[1] == (keep + 1) // 2, (layers, keep, keeps)  # the paper's T/2
                assert last.keep >= 1


def test_stage_ablations_plan_one_stage_or_stage_ii_alone():
    assert [(s.layer, s.keep) for s in plan_for("tops", {"stages": "1"}, 64, 576, 32).stages] == [(0, 64)]
    plan = plan_for("tops", {"stages": "2"}, 300, 576, 32)
    assert [(s.layer, s.keep) for s in plan.stages] == [(12, 168), (24, 84)] and plan.average_tokens() == 300
    # Stage II alone: the first 12 of 32 layers see all 576 tokens, an average of 216 already
    with pytest.raises(InputError, match="smallest it reaches is 217"):
        plan_for("tops", {"stages": "2"}, 64, 576, 32)
    with pytest.raises(InputError, match="stages must be"):
        plan_for("tops", {"stages": "3"}, 64, 576, 32)


def test_a_model_too_shallow_for_stage_ii_is_refused_with_the_way_out():
    with pytest.raises(InputError, match="stages=1"):
        plan_for("tops", {}, 64, 576, 2)
    assert len(plan_for("tops", {"stages": "1"}, 64, 576, 2).stages) == 1
    assert [s.layer for s in plan_for("tops", {"layers": "1"}, 64, 576, 2).stages] == [0, 1]


# --- the published lam, and the switches ------------------------------------------------------------
def test_stage_ii_lam_is_the_papers_value_for_the_budget():
    p = registry.get("tops").resolve_params({})
    assert [T.stage_ii_lam(p, t, 576) for t in (128, 64, 32)] == [0.5, 1.0, 1.0]  # LLaVA-1.5-7B
    assert [T.stage_ii_lam(p, t, 2880, "llava-next") for t in (640, 320, 160)] == [0.5, 0.4, 0.5]
    assert T.stage_ii_lam(p, 100, 576) == 0.5 and T.stage_ii_lam(p, 90, 576) == 1.0  # nearest published ratio
    assert T.stage_ii_lam(dict(p, lam2="0.25"), 64, 576) == 0.25
    assert T.stage_ii_lam(dict(p, coverage=0.0), 64, 576) == 0.0
    with pytest.raises(InputError, match="lam2"):
        T.stage_ii_lam(dict(p, lam2="big"), 64, 576)


def test_the_runtime_feeds_the_budgets_lam_to_the_cut_graph():
    info = registry.get("tops")
    p = info.resolve_params({})
    assert float(info.cut_feeds(p, plan_for("tops", p, 128, 576, 32), "single")["lam"]) == 0.5
    assert float(info.cut_feeds(p, plan_for("tops", p, 64, 576, 32), "single")["lam"]) == 1.0


@pytest.mark.parametrize("switch, weights", [("relevance", ("relevance",)), ("coverage", ("lam",)),
                                              ("diversity", ("alpha",))])
def test_each_criterion_switch_zeroes_its_weight_at_every_stage(switch, weights):
    p = registry.get("tops").resolve_params({switch: 0.0, "lam2": "1.0"})
    for stage in ("vision", "llm"):
        got = T.stage_params(p, stage)
        assert all(got[w] == 0.0 for w in weights)
        assert all(got[w] > 0 for w in ("relevance", "lam", "alpha") if w not in weights)


def test_bad_parameters_fail_in_one_clear_error():
    for bad in ({"norm": "max"}, {"relevance": -1}, {"rater_scaling": "x"}, {"layers": "a,b"}):
        with pytest.raises(InputError):
            info = registry.get("tops")
            info.extra_inputs(info.resolve_params(bad))
    with pytest.raises(InputError, match="takes a number"):
        registry.get("tops").resolve_params({"alpha": "high"})


# --- the registered graphs == their references ----------------------------------------------------
def _session(part):
    return ort.InferenceSession(part.onnx_model().SerializeToString(), providers=["CPUExecutionProvider"])


def test_registered_stage_i_graph_picks_the_reference_indices_on_200_random_cases():
    info = registry.get("tops")
    rng = np.random.default_rng(11)
    sessions = {}
    for case in range(200):
        n = int(rng.integers(2, 49))
        k = int(rng.integers(1, n + 1))
        p = info.resolve_params([{}, {"relevance": 0}, {"coverage": 0}, {"diversity": 0}, {"norm": "mean"}][case % 5])
        key = (n, tuple(sorted(p.items())))
        if key not in sessions:
            layout = {"layout": "single", "tokens_per_crop": n, "grid": [1, n]}
            sessions[key] = _session(selector_part("tops", p, layout, HIDDEN, VISION, merge_outputs=False, at="vision"))
        x = make_inputs(rng, 1, n, duplicates=int(rng.integers(0, 4)), degenerate=int(rng.integers(0, 3)))
        sess = sessions[key]
        feeds = dict(x, keep=np.array(k, dtype=np.int64))
        got = sess.run(["kept_indices"], {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
        ref = info.reference({name: torch.from_numpy(v) for name, v in x.items()}, k, p, (1, n)).numpy()
        assert np.array_equal(got, ref), f"case {case}: n={n} k={k} {p}"


def test_registered_cut_graph_takes_lam_at_run_time_and_picks_the_reference_indices():
    info = registry.get("tops")
    _, reference, _ = info.form("llm")
    rng = np.random.default_rng(12)
    sessions = {}
    for case in range(200):
        n = int(rng.integers(2, 49))
        k = int(rng.integers(1, n + 1))
        p = info.resolve_params([{}, {"relevance": 0}, {"diversity": 0}, {"norm": "mean"},
                                 {"rater_scaling": "sqrt_d"}][case % 5])
        key = tuple(sorted(p.items()))
        if key not in sessions:
            sessions[key] = _session(selector_part("tops", p, {"layout": "single"}, HIDDEN, VISION, at="llm"))
        sess = sessions[key]
        assert [i.name for i in sess.get_inputs()] == ["image_features", "keep", "text_attention", "text_features", "lam"]
        x = cut_inputs(rng, 1, n, duplicates=int(rng.integers(0, 4)), degenerate=int(rng.integers(0, 3)))
        x = {name: x[name] for name in ("image_features", "text_attention", "text_features")}
        x["lam"] = np.array((0.5, 1.0, 0.0, 0.4)[case % 4], dtype=np.float32)
        feeds = dict(x, keep=np.array(k, dtype=np.int64))
        got = sess.run(["kept_indices"], {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
        ref = reference({name: torch.from_numpy(v) for name, v in x.items()}, k, p, (1, n)).numpy()
        assert np.array_equal(got, ref), f"case {case}: n={n} k={k} lam={x['lam']} {p}"


# --- a 32-layer-shaped model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep32():
    from tops_edge.models.llava import LlavaAdapter
    from tops_edge.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=5, text=dict(num_hidden_layers=32))
    return LlavaAdapter(model, processor, source="tiny-llava-32")


@pytest.fixture(scope="module")
def tops32(deep32, tmp_path_factory):
    from tops_edge.export import export_model

    return export_model(deep32, tmp_path_factory.mktemp("tops32") / "out", selector="tops", keep=64, progress=False)


def test_the_export_cuts_at_12_and_24_and_records_no_merging(tops32):
    manifest = json.loads((tops32 / "manifest.json").read_text())
    assert manifest["decoder"]["cuts"] == [12, 24]
    assert {"selector", "cut_selector", "decoder.0", "decoder.1", "decoder.2"} <= set(manifest["parts"])
    assert manifest["selector"]["merge"] == "none" and manifest["selector"]["stage"] == "both"


def test_tops_run_json_shows_three_stages_128_32_16(tops32, capsys):
    from tops_edge.cli import run_main

    assert run_main([str(tops32), "--image", str(EXAMPLE), "--prompt", PROMPTS[0], "--max-new-tokens", "2",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(s["layer"], s["keep"]) for s in out["stages"]] == [(0, 128), (12, 32), (24, 16)]
    first, mid, last = (set(s["kept_indices"]) for s in out["stages"])
    assert last < mid < first


def test_stage_ii_follows_the_prompt_and_stage_i_does_not(tops32, image):
    from tops_edge.runtime import Pipeline

    pipe = Pipeline.load(tops32)
    a, b = (pipe.generate(image, prompt, max_new_tokens=1) for prompt in PROMPTS)
    assert a.stages[0]["kept_indices"] == b.stages[0]["kept_indices"]  # [CLS] attention: no text
    assert a.stages[1]["kept_indices"] != b.stages[1]["kept_indices"]  # the text raters differ


def test_the_pipeline_equals_hf_layers_fed_the_same_kept_sets(tops32, deep32, image):
    """Tokens and first logits against HF's own decoder layers cut at 12 and 24 with the pipeline's
    kept sets; each cut's kept set is the registered reference on HF's hidden states entering the
    cut and HF's attention of the layer before it; Stage I's is the reference on the vision graph's
    outputs."""
    from tops_edge.runtime import Pipeline

    pipe = Pipeline.load(tops32)
    info = registry.get("tops")
    params = info.resolve_params({})
    prompt = PROMPTS[1]
    r = pipe.generate(image, prompt, max_new_tokens=NEW_TOKENS, output_logits=True)
    first = r.stages[0]["kept_indices"]
    slot, after = _prompt_rows(deep32, prompt)
    embeds = hf_pruned_inputs_embeds(deep32.model, deep32.processor, image, prompt, first)
    rows = _keep_rows(r.stages[1:], slot, after, 576, alive=first)
    lm = deep32.model.model.language_model
    entering = {}

    def grab(c):  # the prefill's output of the layer before the cut: the states the cut chooses among
        def hook(module, args, out):
            entering.setdefault(c, (out[0] if isinstance(out, tuple) else out).detach().clone())
        return hook

    hooks = [lm.layers[c - 1].register_forward_hook(grab(c)) for c in (12, 24)]
    try:
        ref, logits, attention = hf_cut_greedy(deep32.model, embeds, torch.zeros(embeds.shape[1]), [12, 24], rows,
                                               NEW_TOKENS, positions=pipe.positions,
                                               eos_token_id=deep32.eos_token_ids[0])
    finally:
        for hook in hooks:
            hook.remove()
    assert r.token_ids == ref
    np.testing.assert_allclose(r.logits[0], logits.numpy(), atol=1e-4)

    # Stage I: the registered reference on the vision graph's own outputs
    pixels, size = pipe.pre.image_inputs(image)
    vision = pipe.vision.run({"pixel_values": pixels[:1]})
    x = {"image_features": torch.from_numpy(vision["image_features"]),
         "cls_attention": torch.from_numpy(vision["cls_attention"])}
    assert info.reference(x, 128, params, (24, 24))[0].tolist() == first
    # Stage II at each cut: the cut reference on HF's states (lam = 1.0, the paper's at 88.9% pruned)
    _, cut_reference, _ = info.form("llm")
    alive = first
    for c, stage in zip((12, 24), r.stages[1:]):
        h, att = entering[c][0], attention[c]
        n = len(alive)
        x = {"image_features": h[None, slot:slot + n], "text_features": h[None, slot + n:],
             "text_attention": att[slot + n:, slot:slot + n][None], "lam": torch.tensor(1.0)}
        chosen = cut_reference(x, stage["keep"], params, (1, n))[0].tolist()
        assert [alive[i] for i in chosen] == stage["kept_indices"]
        alive = stage["kept_indices"]


def test_tops_on_the_2_layer_model_says_how_to_run_stage_i_alone(tmp_path, capsys):
    from tops_edge.cli import export_main

    code = export_main(["--model", "tiny-llava", "--out", str(tmp_path / "x"), "--selector", "tops", "--keep", "64"])
    assert "stages=1" in one_line_error(capsys, code)
    assert not (tmp_path / "x").exists()
    assert export_main(["--model", "tiny-llava", "--out", str(tmp_path / "y"), "--selector", "tops", "--keep", "64",
                        "--selector-param", "stages=1", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "y" / "manifest.json").read_text())
    assert manifest["selector"]["params"]["stages"] == "1" and manifest["decoder"]["cuts"] == []
    code = export_main(["--model", "tiny-llava", "--out", str(tmp_path / "z"), "--selector", "tops",
                        "--selector-param", "stages"])
    assert "KEY=VALUE" in one_line_error(capsys, code)


def test_target_trt_exports_tops_as_standard_ops_that_ort_also_runs(tmp_path):
    """tops has no plugin: its --target trt graphs are the standard-op ones (a Loop), so the export
    loads on ORT; a plugin method's --target trt export is refused there in one clear error."""
    import onnx

    from tops_edge.export import export_model
    from tops_edge.runtime import Pipeline

    out = export_model("tiny-llava-medium", tmp_path / "tops", selector="tops", keep=64, target="trt", progress=False)
    for part in ("selector", "cut_selector"):
        model = onnx.load(out / f"{part}.onnx")
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"} and "Loop" in {n.op_type for n in model.graph.node}
    r = Pipeline.load(out).generate(EXAMPLE, PROMPTS[0], max_new_tokens=1)
    assert [s["layer"] for s in r.stages] == [0, 2, 3]
    plugin = export_model("tiny-llava", tmp_path / "dpp", selector="dpp-merge", keep=64, target="trt", progress=False)
    with pytest.raises(InputError, match="tops::Select"):
        Pipeline.load(plugin)
