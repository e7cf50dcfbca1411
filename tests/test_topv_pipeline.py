"""TopV registered as `topv` and wired into the segmented decoder: the export asks the segment before
its cut for the next layer's probe (cut_target_features) and nothing else does; the exported pipeline
equals HF's own layers cut at the same layer fed the same kept rows, and the kept set is TopV's
reference on HF's own layer-2 sources and targets; the kept set does not depend on the text after the
image; and the refusals (no probe, a bad layer, an anyres layout) are one-line InputErrors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import EXAMPLE, count_bindings
from hf_reference import chat_text, hf_cut_greedy, hf_layer_probe, hf_pruned_inputs_embeds
from tops_edge import selector
from tops_edge.errors import InputError
from tops_edge.export import export_model
from tops_edge.runtime import Pipeline
from tops_edge.selector import topv as T

NEW_TOKENS = 12
PROMPT = "What shapes are in the picture?"
OTHER_PROMPT = "How many circles are there, and what colour is the largest one?"
# --keep 220 on the 6-layer model: K = 42 at layer 2 (34 by importance, 8 recovered). On this image
# and seed the reference's decision margin there (the gap between the last log-importance kept and
# the next) is 2.6e-4, the widest of the budgets 200..550 (most are 2e-5..1e-4: an importance spread
# of 0.065 over 576 tokens); fp32 rounding between ORT and torch is ~1e-6.
KEEP = 220


@pytest.fixture(scope="module")
def topv_dir(tmp_path_factory, deep):
    """topv at its default layer 2, the decoder also cut at 4 (a cut topv does not prune at)."""
    return export_model(deep, tmp_path_factory.mktemp("topv") / "out", selector="topv", keep=KEEP, cuts=[2, 4],
                        progress=False)


@pytest.fixture(scope="module")
def fastv_dir(tmp_path_factory, deep):
    return export_model(deep, tmp_path_factory.mktemp("fastv") / "out", selector="fastv", keep=KEEP, progress=False)


def _slot(deep, prompt):
    """(image slot, text tokens after the image) of the prompt's chat text."""
    ids = deep.processor.tokenizer(chat_text(deep.processor, prompt)).input_ids
    slot = ids.index(deep.config.image_token_id)
    return slot, len(ids) - slot - 1


def _hf_topv_choice(deep, image, prompt, keep, layer=2):
    """TopV's reference on HF's own sources (the visual hidden states entering `layer`) and targets
    (that layer's post-attention norm on the whole prompt), on the 24 x 24 grid."""
    slot, _ = _slot(deep, prompt)
    embeds = hf_pruned_inputs_embeds(deep.model, deep.processor, image, prompt, list(range(576)))
    h, t = hf_layer_probe(deep.model, embeds, layer)
    x = {"image_features": h[:, slot:slot + 576], "target_features": t[:, slot:slot + 576],
         "token_positions": torch.from_numpy(T.token_positions(np.arange(576), 24, 24))[None]}
    info = selector.get("topv")
    return info.reference(x, keep, info.resolve_params({}), (24, 24))[0].tolist()


# --- (a) the export ----------------------------------------------------------------------------------
def test_registered_as_an_in_llm_method_with_fastvs_schedule():
    from tops_edge.selector.plan import plan_for

    info = selector.get("topv")
    assert info.stage == "llm" and info.merge == "none" and info.prunes
    assert info.params == {"layer": 2, **T.DEFAULT_PARAMS}
    assert info.extra_inputs(info.resolve_params({})) == T.TOPV_INPUTS == ("target_features", "token_positions")
    for average in (40, 64, 300):  # LLaVA-1.5's depth and tokens: fastv's budgets exactly
        assert plan_for("topv", None, average, 576, 32).stages == tuple(
            type(s)(s.layer, "topv", s.keep) for s in plan_for("fastv", None, average, 576, 32).stages)
    assert [s.layer for s in plan_for("topv", {"layer": 3}, 64, 576, 32).stages] == [3]


def test_export_writes_the_probe_only_on_the_segment_before_cut_2(topv_dir, fastv_dir):
    manifest = json.loads((topv_dir / "manifest.json").read_text())
    dec, parts = manifest["decoder"], manifest["parts"]
    assert dec["cuts"] == [2, 4]
    assert dec["segments"] == [{"part": "decoder.0", "layers": [0, 2], "probe": True},
                               {"part": "decoder.1", "layers": [2, 4]}, {"part": "decoder.2", "layers": [4, 6]}]
    outputs = {name: [o["name"] for o in parts[name]["outputs"] if not o["name"].startswith("present.")]
               for name in ("decoder.0", "decoder.1", "decoder.2")}
    assert outputs == {"decoder.0": ["cut_hidden_states", "cut_attention", "cut_target_features"],
                       "decoder.1": ["cut_hidden_states", "cut_attention"], "decoder.2": ["logits"]}
    assert [s["name"] for s in parts["selector"]["inputs"]] == ["image_features", "keep", "target_features",
                                                                "token_positions"]
    assert manifest["selector"]["stage"] == "llm" and manifest["selector"]["merge"] == "none"
    # a fastv export's cut segment computes no probe
    fastv = json.loads((fastv_dir / "manifest.json").read_text())
    assert all("probe" not in seg for seg in fastv["decoder"]["segments"])
    assert "cut_target_features" not in {o["name"] for o in fastv["parts"]["decoder.0"]["outputs"]}


def test_tops_run_json_shows_one_stage_at_layer_2(topv_dir, capsys):
    from tops_edge.cli import run_main

    assert run_main([str(topv_dir), "--image", str(EXAMPLE), "--prompt", PROMPT, "--max-new-tokens", "2", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [(s["layer"], s["keep"], len(s["kept_indices"])) for s in stages] == [(2, 42, 42)]


# --- (b) parity with HF ------------------------------------------------------------------------------
def test_pipeline_equals_hf_layers_cut_at_2_and_keeps_topvs_choice_on_hfs_probe(topv_dir, deep, image):
    """The greedy tokens equal HF's decoder layers cut at the export's cuts fed the pipeline's kept
    rows at layer 2 (every later layer, layer 2 included, caching only them), the first logits within
    1e-4; and the kept set is topv's reference on HF's hidden states entering layer 2 and HF's layer-2
    post-attention norm of them on the whole prompt."""
    pipe = Pipeline.load(topv_dir)
    r = pipe.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert [s["layer"] for s in r.stages] == [2] and r.stages[0]["keep"] == 42
    kept = r.stages[0]["kept_indices"]
    assert kept == sorted(set(kept)) and len(kept) == 42
    slot, after = _slot(deep, PROMPT)
    embeds = hf_pruned_inputs_embeds(deep.model, deep.processor, image, PROMPT, list(range(576)))
    rows = list(range(slot)) + [slot + k for k in kept] + list(range(slot + 576, slot + 576 + after))
    ref, logits, _ = hf_cut_greedy(deep.model, embeds, torch.zeros(embeds.shape[1]), [2, 4], [rows, None], NEW_TOKENS,
                                   positions=pipe.positions, eos_token_id=deep.eos_token_ids[0])
    assert len(r.token_ids) >= 8 and r.token_ids == ref
    np.testing.assert_allclose(r.logits[0], logits.numpy(), atol=1e-4)
    assert _hf_topv_choice(deep, image, PROMPT, 42) == kept
    # layer 2 on, every segment caches only the kept visual tokens (K and V, fp32, 2 layers each)
    per_layer = 2 * deep.num_kv_heads * deep.head_dim * 4
    held = slot + after + len(r.token_ids) - 1  # the prompt's text and the fed-back tokens
    assert r.segment_kv_bytes == [2 * per_layer * (held + 576), 2 * per_layer * (held + 42), 2 * per_layer * (held + 42)]


def test_the_probe_segment_binds_nothing_per_token(topv_dir, image):
    """Its extra output is bound at each prefill, and once per cache size for decode steps (which
    write it into a scratch buffer nobody reads), however many tokens the loop decodes."""
    pipe = Pipeline.load(topv_dir)

    # as a fastv export's segments (test_segments), plus the probe's output at prefill
    assert count_bindings(pipe, image, PROMPT, 9) == count_bindings(pipe, image, PROMPT, 4) == [10, 9, 7]


# --- (c) no text ------------------------------------------------------------------------------------
def test_the_kept_set_does_not_depend_on_the_text_after_the_image(topv_dir, deep, image):
    """In LLaVA the image precedes the question and attention is causal: the visual tokens' states at
    layer 2, and so TopV's sources and targets, are the same whatever the question."""
    pipe = Pipeline.load(topv_dir)
    first, second = (pipe.generate(image, p, max_new_tokens=1).stages[0]["kept_indices"] for p in (PROMPT, OTHER_PROMPT))
    assert _slot(deep, PROMPT)[1] != _slot(deep, OTHER_PROMPT)[1]  # different text after the image
    assert first == second
    assert _hf_topv_choice(deep, image, OTHER_PROMPT, 42) == second


# --- (d) refusals ------------------------------------------------------------------------------------
def _one_line(excinfo, *needles):
    text = str(excinfo.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


def test_use_selector_topv_without_the_probe_is_refused(fastv_dir, image):
    pipe = Pipeline.load(fastv_dir)
    assert pipe.cuts == (2,) and pipe.probed_cuts == ()
    with pytest.raises(InputError) as e:
        pipe.use_selector("topv")
    _one_line(e, "re-export with tops-export --selector topv", "layer 2")
    assert pipe.selector_method == "fastv"  # nothing switched
    with pytest.raises(InputError) as e:  # a cut the export does not have, let alone probe
        pipe.use_selector("topv", layer=3)
    _one_line(e, "not cut there", "--selector topv --selector-param layer=3")
    # the refusals left the pipeline as it was: fastv still runs
    assert pipe.generate(image, PROMPT, max_new_tokens=1).stages[0]["layer"] == 2


def test_switching_away_from_topv_and_back_on_its_own_export(topv_dir, image):
    pipe = Pipeline.load(topv_dir)
    own = pipe.generate(image, PROMPT, max_new_tokens=1).stages
    pipe.use_selector("fastv")
    assert pipe.generate(image, PROMPT, max_new_tokens=1).stages[0]["keep"] == 42
    pipe.use_selector("topv", recover=0.0)  # other parameters: built at run time, the probe is there
    no_stride = pipe.generate(image, PROMPT, max_new_tokens=1).stages
    assert no_stride[0]["layer"] == 2 and no_stride[0]["kept_indices"] != own[0]["kept_indices"]
    pipe.use_selector("topv")
    assert pipe.generate(image, PROMPT, max_new_tokens=1).stages == own


@pytest.mark.parametrize("params, needle", [({"layer": 0}, "topv's layer must be a decoder cut >= 1"),
                                            ({"layer": 6}, "topv's layer must be a cut in 1..5"),
                                            ({"epsilon": 0.0}, "epsilon"), ({"iterations": 0}, "iterations")])
def test_a_bad_parameter_is_refused_at_export_and_at_run_time(tmp_path, deep, fastv_dir, params, needle):
    out = tmp_path / "bad"
    with pytest.raises(InputError) as e:
        export_model(deep, out, selector="topv", keep=KEEP, selector_params=params, progress=False)
    _one_line(e, needle)
    assert not out.exists()
    with pytest.raises(InputError) as e:
        Pipeline.load(fastv_dir).use_selector("topv", **params)
    _one_line(e, needle)


def test_an_anyres_model_is_refused_before_any_export_work(tmp_path):
    from tops_edge.models import load

    out = tmp_path / "next"
    with pytest.raises(InputError) as e:
        export_model(load("tiny-llava-next"), out, selector="topv", keep=1000, selector_params={"layer": 1},
                     progress=False)
    _one_line(e, "selector 'topv'", "anyres")
    assert not out.exists()


def test_the_manifest_footprint_counts_the_probes_copy_of_layer_2s_attention(topv_dir, deep):
    """A topv export's decoder graphs hold layer 2's attention twice (the probe in decoder.0, the
    layer itself in decoder.1): the recorded footprint counts both, as the memory planner must."""
    import onnx

    from tops_edge.plan import footprint_of

    manifest = json.loads((topv_dir / "manifest.json").read_text())
    recorded, plain = manifest["footprint"], footprint_of(deep)
    attention = deep.model.model.language_model.layers[2].self_attn
    extra = sum(p.numel() for p in attention.parameters()) + 2 * deep.hidden_size  # + its two norms
    assert recorded["decoder_matmul"] + recorded["decoder_other"] == plain.decoder_matmul + plain.decoder_other + extra
    held = sum(int(np.prod(t.dims)) for part in ("decoder.0", "decoder.1", "decoder.2")
               for t in onnx.load(str(topv_dir / f"{part}.onnx")).graph.initializer)
    assert held == pytest.approx(recorded["decoder_matmul"] + recorded["decoder_other"], rel=0.01)
