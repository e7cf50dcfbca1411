"""The pruned pipeline end to end: TOPS through `tops-run --json`, both position conventions, against
HF transformers fed the same kept tokens; instruction-aware selection; the vision graph's extras."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hf_reference import (chat_text, hf_generate_from_embeds, hf_greedy_with_bias, hf_greedy_with_positions, hf_merged_inputs,
                          hf_pruned_inputs_embeds)
from tops_edge.cli import run_main
from tops_edge.export import export_model
from tops_edge.runtime import Pipeline
from cli_helpers import EXAMPLE

NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["compact", "original"])
def tops_dir(request, tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("dpp-merge") / request.param
    return export_model(tiny, out, selector="dpp-merge", keep=64, positions=request.param, progress=False)


def test_tops_run_json_k64_equals_hf_fed_the_same_kept_tokens(tops_dir, tiny, capsys):
    from PIL import Image

    prompt = "What shapes are in the picture?"
    assert run_main([str(tops_dir), "--image", str(EXAMPLE), "--prompt", prompt, "--keep", "64",
                     "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    kept = ours["kept_indices"]
    assert len(kept) == 64 and kept == sorted(set(kept))
    image = Image.open(EXAMPLE)
    selector = json.loads((tops_dir / "manifest.json").read_text())["selector"]
    assert selector["merge"] == "mean"  # the default: the kept tokens carry their merged groups
    embeds, bias = hf_merged_inputs(tiny.model, tiny.processor, image, prompt, kept)
    eos = tiny.eos_token_ids[0]
    if selector["positions"] == "compact":
        ref = hf_greedy_with_bias(tiny.model, embeds, bias, NEW_TOKENS, eos_token_id=eos)
    else:
        ids = tiny.processor.tokenizer(chat_text(tiny.processor, prompt)).input_ids
        slot = ids.index(tiny.config.image_token_id)
        after = len(ids) - slot - 1
        pos = torch.cat([torch.arange(slot), slot + torch.tensor(kept), slot + 576 + torch.arange(after)])
        ref = hf_greedy_with_bias(tiny.model, embeds, bias, NEW_TOKENS, positions=pos, eos_token_id=eos)
        # and the two conventions really differ on this model and prompt
        assert ref != hf_greedy_with_bias(tiny.model, embeds, bias, NEW_TOKENS, eos_token_id=eos)
    assert len(ours["token_ids"]) >= 12
    assert ours["token_ids"] == ref
    # selection only (merge none): HF's own generate on the kept tokens, unmerged
    pipe = Pipeline.load(tops_dir)
    pipe.merge = "none"
    plain = pipe.generate(image, prompt, max_new_tokens=NEW_TOKENS, keep=64)
    assert plain.kept_indices == kept
    embeds = hf_pruned_inputs_embeds(tiny.model, tiny.processor, image, prompt, kept)
    if selector["positions"] == "compact":
        assert plain.token_ids == hf_generate_from_embeds(tiny.model, embeds, NEW_TOKENS)
    else:
        assert plain.token_ids == hf_greedy_with_positions(tiny.model, embeds, pos, NEW_TOKENS, eos)


def test_tops_kept_tokens_follow_the_instruction(tops_dir, images):
    pipe = Pipeline.load(tops_dir)
    a = pipe.generate(images["square"], "Where is the red circle?", max_new_tokens=1, keep=64).kept_indices
    b = pipe.generate(images["square"], "Count the blue squares on the right.", max_new_tokens=1, keep=64).kept_indices
    assert a != b
    # the chat template and image slot are not part of the instruction: the same words, the same tokens
    c = pipe.generate(images["square"], "Where is the red circle?", max_new_tokens=1, keep=64).kept_indices
    assert a == c


def test_uniform_kept_tokens_ignore_the_instruction(pipe_uniform, images):
    a = pipe_uniform.generate(images["square"], "Where is the red circle?", max_new_tokens=1, keep=64).kept_indices
    b = pipe_uniform.generate(images["square"], "Count the blue squares.", max_new_tokens=1, keep=64).kept_indices
    assert a == b


def test_keep_n_skips_the_selector_and_equals_the_unpruned_pipeline(tops_dir, tiny_none_dir, images):
    pruned = Pipeline.load(tops_dir).generate(images["wide"], "Describe it.", max_new_tokens=8, keep=576)
    full = Pipeline.load(tiny_none_dir).generate(images["wide"], "Describe it.", max_new_tokens=8)
    assert pruned.kept_indices == list(range(576))
    assert pruned.token_ids == full.token_ids


def test_vision_graph_cls_attention_matches_hf_eager_attentions(tiny, tmp_path, images):
    out = export_model(tiny, tmp_path / "attn", selector="attention", keep=64, progress=False)
    sess = ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    pixels = tiny.processor.image_processor(images=images["tall"], return_tensors="np")["pixel_values"]
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixel_values": pixels})))
    model = type(tiny.model)(tiny.config)  # a copy to switch to eager attention without touching the shared one
    model.load_state_dict(tiny.model.state_dict())
    model.eval().model.vision_tower.set_attn_implementation("eager")
    with torch.no_grad():
        att = model.model.vision_tower(torch.from_numpy(pixels), output_attentions=True).attentions
    expected = att[tiny.config.vision_feature_layer].mean(1)[:, 0, 1:].numpy()
    assert got["cls_attention"].shape == (1, 576)
    np.testing.assert_allclose(got["cls_attention"], expected, rtol=1e-4, atol=1e-6)
    kept = Pipeline.load(out).generate(images["tall"], "Hi", max_new_tokens=1, keep=64).kept_indices
    assert kept == sorted(np.argsort(-expected[0], kind="stable")[:64].tolist())


@pytest.mark.parametrize("flags, needle", [
    (["--selector", "divprune", "--beta", "0.5"], "no parameter 'beta'"),
    (["--selector", "dpp-merge", "--similarity", "pixels"], "invalid choice"),
])
def test_export_refuses_parameters_the_selector_does_not_have(tmp_path, capsys, flags, needle):
    from tops_edge.cli import export_main

    assert export_main(["--model", "tiny-llava", "--out", str(tmp_path / "o"), "--quiet", *flags]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
