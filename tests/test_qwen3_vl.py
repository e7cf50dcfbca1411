"""Qwen3-VL: export + runtime parity with HF transformers on the same weights, DeepStack included.

Unpruned: greedy tokens equal HF `generate` for square, wide and tall images and one at max_pixels
(tiny-qwen3-vl) and on a saved checkpoint of another config. Pruned before the LLM: equal to HF's
decoder layers fed the kept tokens, their get_rope_index positions and their DeepStack rows added
after layers 0..L_ds-1 (HF's rule, on the rows that remain). Pruned at a cut inside the DeepStack
layers (FastV at layer 2 of 3 injected ones): the same, with the rows dropped before layer 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import hf_cut_greedy
from qwen_helpers import NEW_TOKENS, PROMPT, hf_pruned_deepstack, hf_pruned_prompt, hf_qwen_generate
from qwen_helpers import image as _image

from tops_edge.export import export_model
from tops_edge.models import load
from tops_edge.runtime import Pipeline

#: (width, height): square, wide, tall, and the tiny processor's max_pixels (512 x 512)
SIZES = [(224, 224), (384, 192), (160, 480), (512, 512)]


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-qwen3-vl")


@pytest.fixture(scope="module")
def plain(tiny, tmp_path_factory):
    return Pipeline.load(export_model(tiny, tmp_path_factory.mktemp("qwen3") / "plain", progress=False))


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_unpruned_greedy_equals_hf_generate(tiny, plain, size):
    image = _image(*size)
    got = plain.generate(image, PROMPT, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == hf_qwen_generate(tiny.model, tiny.processor, image)
    w, h = size
    assert got.num_visual_tokens == round(h / 32) * round(w / 32)


def test_deepstack_reaches_the_decoder(tiny, plain):
    """The segment holding layers 0..2 takes deepstack_embeds, and they matter: without them the
    first logits move (so the parity above depends on them)."""
    (runner,) = plain.decoders
    assert runner.deepstack_rows == 3
    image = _image(224, 224, seed=3)
    with_rows = plain.generate(image, PROMPT, max_new_tokens=1, output_logits=True).logits[0]
    original = plain._deepstack
    try:
        plain._deepstack = staticmethod(lambda *a, **k: None)
        without = plain.generate(image, PROMPT, max_new_tokens=1, output_logits=True).logits[0]
    finally:
        plain._deepstack = original
    assert np.abs(with_rows - without).max() > 1e-3


def test_saved_checkpoint_of_another_config(tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    from tops_edge.models.tiny_qwen import load_qwen_processor
    from tops_edge.models.tiny_qwen3 import build_tiny_qwen3

    model, processor = build_tiny_qwen3(
        seed=5, vision=dict(depth=3, hidden_size=48, num_heads=3, deepstack_visual_indexes=[0, 2], out_hidden_size=96),
        text=dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=160),
        pixels=dict(max_pixels=384 * 384))
    folder = tmp_path / "qwen3-other"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    hf = Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()
    hf_processor = load_qwen_processor(folder)
    pipe = Pipeline.load(export_model(str(folder), tmp_path / "out", progress=False))
    assert pipe.layout.max_tokens == 144 and pipe.decoders[0].deepstack_rows == 2
    for size in [(192, 192), (384, 160), (384, 384)]:
        image = _image(*size, seed=1)
        assert pipe.generate(image, PROMPT, max_new_tokens=NEW_TOKENS).token_ids == hf_qwen_generate(hf, hf_processor, image)


def test_pruned_equals_hf_layers_with_the_kept_deepstack_rows(tiny, tmp_path):
    pipe = Pipeline.load(export_model(tiny, tmp_path / "dpp", selector="dpp-merge", merge="none", keep=20,
                                      progress=False))
    image = _image(384, 192, seed=2)
    got = pipe.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, keep=20)
    embeds, positions = hf_pruned_prompt(tiny.model, tiny.processor, image, got.kept_indices)
    deepstack = hf_pruned_deepstack(tiny.model, tiny.processor, image, got.kept_indices)
    ref, _, _ = hf_cut_greedy(tiny.model, embeds, torch.zeros(embeds.shape[1]), [], [], NEW_TOKENS, positions,
                              eos_token_id=tiny.eos_token_ids[0], deepstack=deepstack)
    assert got.token_ids == ref


def test_cut_inside_the_deepstack_layers(tiny, tmp_path):
    """FastV cuts before layer 2, which still receives a DeepStack row: after the cut only the kept
    tokens' rows are added, as HF's rule gives on the rows that remain."""
    pipe = Pipeline.load(export_model(tiny, tmp_path / "fastv", selector="fastv", selector_params={"layer": 2},
                                      progress=False))
    assert [r.deepstack_rows for r in pipe.decoders] == [2, 1]
    image = _image(384, 192, seed=4)
    got = pipe.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, keep=56)
    (stage,) = got.stages
    n = got.num_visual_tokens
    assert stage["layer"] == 2 and stage["keep"] < n
    embeds, positions = hf_pruned_prompt(tiny.model, tiny.processor, image, list(range(n)))
    deepstack = hf_pruned_deepstack(tiny.model, tiny.processor, image, list(range(n)))
    inputs = tiny.processor(text=[tiny.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True)],
        images=[image], return_tensors="pt")
    start = int((inputs["input_ids"][0] == tiny.model.config.image_token_id).nonzero()[0, 0])
    rows = np.concatenate([np.arange(start), start + np.asarray(stage["kept_indices"]), np.arange(start + n, embeds.shape[1])])
    ref, _, _ = hf_cut_greedy(tiny.model, embeds, torch.zeros(embeds.shape[1]), [2], [rows], NEW_TOKENS, positions,
                              eos_token_id=tiny.eos_token_ids[0], deepstack=deepstack)
    assert got.token_ids == ref


@pytest.mark.parametrize("method", ["dpp-merge", "cdpruner", "divprune", "attention", "uniform", "random"])
def test_pre_llm_selectors_run(plain, tiny, tmp_path_factory, method):
    pipe = Pipeline.load(export_model(tiny, tmp_path_factory.mktemp("q3sel") / method, selector=method, progress=False))
    result = pipe.generate(_image(224, 224, seed=6), PROMPT, max_new_tokens=2, keep=16)
    assert [(s["layer"], s["keep"]) for s in result.stages] == [(0, 16)]


def test_dry_run_plans_qwen3_from_built_in_configs(capsys):
    from tops_edge.cli import export_main

    code = export_main(["--model", "qwen3-vl-8b", "--out", "unused", "--device", "orin-nx", "--dry-run",
                        "--precision", "int8-wo", "--max-image-tokens", "1024"])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory plan: Qwen/Qwen3-VL-8B-Instruct on orin-nx" in out and "36 layers x 8 heads x 128" in out


@pytest.mark.parametrize("precision", ["int8", "int4-wo"])
def test_calibrated_precisions_feed_the_deepstack_rows(tiny, tmp_path, precision):
    """int8 and int4-wo (AWQ) calibrate on the fp32 pipeline's captured prefills, which for Qwen3-VL
    include the DeepStack rows of the segment's first layers; the converted export answers."""
    import onnx

    pipe = Pipeline.load(export_model(tiny, tmp_path / precision, selector="dpp-merge", precision=precision,
                                      progress=False))
    result = pipe.generate(_image(224, 224, seed=9), PROMPT, max_new_tokens=3, keep=24)
    assert len(result.token_ids) >= 1 and result.stages[0]["keep"] == 24
    graph = onnx.load(str(tmp_path / precision / pipe.manifest["parts"]["decoder"]["files"][0]["path"]),
                      load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert ("DequantizeLinear" in ops) and ("deepstack_embeds" in {i.name for i in graph.graph.input})
