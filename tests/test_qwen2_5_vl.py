"""Qwen2.5-VL: export + runtime parity with HF transformers on the same weights.

Unpruned: greedy tokens equal HF `generate` (fed `mm_token_type_ids`, so HF uses M-RoPE) for square,
wide and tall images and one at the processor's max_pixels, on the built-in tiny model and on a saved
checkpoint of another config. Pruned: equal to HF's forward fed the same kept tokens with the position
ids HF's own `get_rope_index` gives the unpruned prompt (the kept columns); inside the LLM: equal to
HF's own decoder layers pruned at the same cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from hf_reference import hf_cut_greedy
from qwen_helpers import PROMPT, NEW_TOKENS, chat as _chat, hf_pruned_prompt, hf_qwen_generate, image as _image

from tops_edge.export import export_model
from tops_edge.models import load
from tops_edge.runtime import Pipeline

#: (width, height): square, wide, tall, and one at the tiny processor's max_pixels (448 x 448)
SIZES = [(224, 224), (392, 196), (140, 420), (448, 448)]


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-qwen2.5-vl")


@pytest.fixture(scope="module")
def plain(tiny, tmp_path_factory):
    out = export_model(tiny, tmp_path_factory.mktemp("qwen") / "plain", progress=False)
    return Pipeline.load(out)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_unpruned_greedy_equals_hf_generate(tiny, plain, size):
    image = _image(*size)
    ref = hf_qwen_generate(tiny.model, tiny.processor, image)
    got = plain.generate(image, PROMPT, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == ref
    w, h = size
    assert got.num_visual_tokens == (h // 28) * (w // 28)  # every size here is whole 28 px tokens within the cap


def test_vision_graph_equals_hf_image_features(tiny, plain):
    image = _image(392, 196)
    inputs = tiny.processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        ref = tiny.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    pixels, grid = plain.pre.image_inputs(image)
    token_map = plain.layout.token_map(grid)
    out = plain.vision.run(plain.layout.vision_feeds(pixels, grid, token_map))["image_features"][0]
    assert out.shape == tuple(ref.shape)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=0)


def test_mrope_positions_equal_hf_rope_index(tiny, plain):
    """The runtime's M-RoPE rows equal HF's get_rope_index on the unpruned prompt, and after pruning
    the kept columns of it (`original`)."""
    image = _image(140, 420)
    inputs = tiny.processor(text=[_chat(tiny.processor)], images=[image], return_tensors="pt")
    ref, _ = tiny.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"])
    before, after = plain.pre.split_ids(plain.pre.prompt_text(PROMPT))
    token_map = plain.layout.token_map(plain.pre.image_inputs(image)[1])
    n = len(token_map)
    full = plain.prompt_positions(len(before), np.arange(n), len(after), n, token_map)
    np.testing.assert_array_equal(full, ref[:, 0].numpy())
    kept = np.array([0, 3, 7, n - 1])
    rows = np.concatenate([np.arange(len(before)), len(before) + kept, len(before) + n + np.arange(len(after))])
    np.testing.assert_array_equal(plain.prompt_positions(len(before), kept, len(after), n, token_map), ref[:, 0, rows].numpy())


def test_saved_checkpoint_of_another_config(tmp_path):
    """A tiny Qwen2.5-VL of other shapes, saved as a HF folder: loaded by path, exported, equal to HF
    loaded from the same folder."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tops_edge.models.tiny_qwen import build_tiny_qwen, load_qwen_processor

    model, processor = build_tiny_qwen(
        seed=3, vision=dict(depth=3, fullatt_block_indexes=[2], hidden_size=48, num_heads=3, window_size=56,
                    out_hidden_size=96),
        text=dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                  intermediate_size=160),
        pixels=dict(max_pixels=336 * 336))
    folder = tmp_path / "qwen-other"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    hf_processor = load_qwen_processor(folder)
    pipe = Pipeline.load(export_model(str(folder), tmp_path / "out", progress=False))
    assert pipe.layout.max_tokens == 144
    for size in [(168, 168), (336, 140), (336, 336)]:
        image = _image(*size, seed=1)
        assert pipe.generate(image, PROMPT, max_new_tokens=NEW_TOKENS).token_ids == hf_qwen_generate(hf, hf_processor, image)


@pytest.fixture(scope="module")
def pruned(tiny, tmp_path_factory):
    out = export_model(tiny, tmp_path_factory.mktemp("qwen") / "dpp", selector="dpp-merge", merge="none", keep=24,
                       progress=False)
    return Pipeline.load(out)


@pytest.mark.parametrize("size", [(224, 224), (392, 196)], ids=["square", "wide"])
def test_pruned_equals_hf_fed_the_kept_tokens(tiny, pruned, size):
    image = _image(*size, seed=2)
    got = pruned.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, keep=24)
    assert len(got.kept_indices) == 24
    embeds, positions = hf_pruned_prompt(tiny.model, tiny.processor, image, got.kept_indices)
    ref, _, _ = hf_cut_greedy(tiny.model, embeds, torch.zeros(embeds.shape[1]), [], [], NEW_TOKENS, positions,
                              eos_token_id=tiny.eos_token_ids[0])
    assert got.token_ids == ref


def test_in_llm_cut_equals_hf_layers_pruned_there(tiny, tmp_path):
    """FastV at layer 2 of the tiny Qwen: the pipeline's tokens equal HF's own decoder layers with
    the same rows dropped before layer 2, M-RoPE positions kept."""
    pipe = Pipeline.load(export_model(tiny, tmp_path / "fastv", selector="fastv", selector_params={"layer": 2},
                                      progress=False))
    image = _image(392, 196, seed=4)
    got = pipe.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, keep=64)
    (stage,) = got.stages
    assert stage["layer"] == 2 and stage["keep"] < 98
    n = got.num_visual_tokens
    embeds, positions = hf_pruned_prompt(tiny.model, tiny.processor, image, list(range(n)))
    inputs = tiny.processor(text=[_chat(tiny.processor)], images=[image], return_tensors="pt")
    start = int((inputs["input_ids"][0] == tiny.model.config.image_token_id).nonzero()[0, 0])
    rows = np.concatenate([np.arange(start), start + np.asarray(stage["kept_indices"]),
                           np.arange(start + n, embeds.shape[1])])
    ref, _, _ = hf_cut_greedy(tiny.model, embeds, torch.zeros(embeds.shape[1]), [2], [rows], NEW_TOKENS, positions,
                              eos_token_id=tiny.eos_token_ids[0])
    assert got.token_ids == ref


def test_compact_positions_refused(tiny, tmp_path):
    from tops_edge.errors import InputError

    with pytest.raises(InputError, match="M-RoPE"):
        export_model(tiny, tmp_path / "compact", positions="compact", progress=False)
    assert not (tmp_path / "compact").exists()


def test_max_image_tokens_caps_the_grid(tiny, tmp_path):
    adapter = load("tiny-qwen2.5-vl")
    pipe = Pipeline.load(export_model(adapter, tmp_path / "capped", max_image_tokens=64, progress=False))
    assert pipe.layout.max_tokens == 64
    result = pipe.generate(_image(448, 448), PROMPT, max_new_tokens=2)
    assert result.num_visual_tokens <= 64


def test_cli_bad_inputs_one_line(tmp_path, capsys):
    from tops_edge.cli import export_main

    code = export_main(["--model", "tiny-llava", "--out", str(tmp_path / "x"), "--max-image-tokens", "64", "--quiet"])
    assert "--max-image-tokens applies to dynamic-resolution models" in one_line_error(capsys, code)
    code = export_main(["--model", "tiny-qwen2.5-vl", "--out", str(tmp_path / "y"), "--positions", "compact", "--quiet"])
    assert "M-RoPE" in one_line_error(capsys, code)
    code = export_main(["--model", "tiny-qwen2.5-vl", "--out", str(tmp_path / "z"), "--max-image-tokens", "2", "--quiet"])
    assert "--max-image-tokens must be" in one_line_error(capsys, code)
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_extreme_aspect_ratio_is_one_line(plain):
    from tops_edge.errors import InputError

    with pytest.raises(InputError, match="cannot be preprocessed"):
        plain.generate(_image(5000, 20), PROMPT, max_new_tokens=2)


def test_prompt_past_the_context(plain):
    from tops_edge.errors import ContextLengthError

    with pytest.raises(ContextLengthError):
        plain.generate(_image(224, 224), "word " * 1200, max_new_tokens=2)


def test_dry_run_plans_the_7b_from_its_built_in_config(capsys):
    from tops_edge.cli import export_main

    code = export_main(["--model", "qwen2.5-vl-7b", "--out", "unused", "--device", "orin-nx", "--dry-run",
                        "--precision", "int8-wo", "--max-image-tokens", "1280"])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory plan: Qwen/Qwen2.5-VL-7B-Instruct on orin-nx" in out
    assert "28 layers x 4 heads x 128" in out  # the built-in config's decoder: 28 layers, 4 KV heads of 128
    assert "verdict: fits" in out


@pytest.fixture(scope="module")
def paper(tiny, tmp_path_factory):
    """The paper's tops (before the LLM and at cuts 2 and 3 of the tiny 4-layer decoder)."""
    return Pipeline.load(export_model(tiny, tmp_path_factory.mktemp("qwen") / "tops", selector="tops", progress=False))


@pytest.mark.parametrize("method", ["dpp-merge", "cdpruner", "divprune", "attention", "uniform", "random", "tops"])
def test_every_selector_runs_on_the_dynamic_grid(paper, method):
    """Each method on a wide image's 14 x 7 grid: the stages its plan says, each keeping the tokens it
    should, all inside the image's 98."""
    from tops_edge.selector.plan import plan_for

    paper.use_selector(method)
    image = _image(392, 196, seed=5)
    result = paper.generate(image, PROMPT, max_new_tokens=3, keep=40)
    plan = plan_for(method, paper.selector_params, 40, 98, paper.num_layers)
    assert [(s["layer"], s["keep"]) for s in result.stages] == [(s.layer, s.keep) for s in plan.stages]
    for stage in result.stages:
        assert len(set(stage["kept_indices"])) == stage["keep"]
        assert all(0 <= i < 98 for i in stage["kept_indices"])


def test_attention_substitute_keeps_the_most_attended_tokens(paper):
    """Qwen's ViT has no [CLS]: `attention` ranks tokens by the vision graph's cls_attention (the mean
    attention each token receives in the last block), and keeps the top K of it."""
    paper.use_selector("attention")
    image = _image(224, 224, seed=6)
    result = paper.generate(image, PROMPT, max_new_tokens=2, keep=20)
    pixels, grid = paper.pre.image_inputs(image)
    token_map = paper.layout.token_map(grid)
    scores = paper.vision.run(paper.layout.vision_feeds(pixels, grid, token_map))["cls_attention"][0]
    assert np.isclose(scores.sum(), 1.0, atol=1e-5)
    assert sorted(result.kept_indices) == sorted(np.argsort(-scores, kind="stable")[:20].tolist())


def test_topv_reads_the_image_grid(tiny, tmp_path):
    """TopV's spatial terms read each kept token's (row, col) on the image's own grid."""
    pipe = Pipeline.load(export_model(tiny, tmp_path / "topv", selector="topv", selector_params={"layer": 2},
                                      progress=False))
    result = pipe.generate(_image(140, 420, seed=7), PROMPT, max_new_tokens=2, keep=60)
    (stage,) = result.stages
    assert stage["layer"] == 2 and 0 < stage["keep"] < 75
    assert pipe._token_positions(np.array([0, 4, 5, 74])).tolist() == [[0, 0], [0, 4], [1, 0], [14, 4]]


def test_kept_view_rebuilds_the_resized_image(plain, tmp_path):
    """--show-kept on Qwen: the patches are put back into the resized image (here one that needs no
    resizing: 224 x 336 px is 8 x 12 tokens of 28 px), and the picture is written."""
    from tops_edge.runtime.kept_view import Stage, model_views, show_kept

    image = _image(336, 224, seed=8)
    crops, grid = model_views(plain, image)
    assert grid == (16, 24) and crops[0].shape == (224, 336, 3)
    assert np.abs(crops[0].astype(int) - np.asarray(image, dtype=int)).max() <= 1
    result = plain.generate(image, PROMPT, max_new_tokens=1)
    path = show_kept(plain, image, [Stage.of(result)], tmp_path / "kept.png")
    assert path.stat().st_size > 0


def test_tensorrt_profiles_span_the_dynamic_image(plain):
    from tops_edge.plan import get_preset
    from tops_edge.plan.profiles import optimization_profiles

    profiles = optimization_profiles(plain.manifest, get_preset("orin-nx"))
    vision = profiles["vision"]
    assert vision["pixel_values"] == ((16, 1176), (512, 1176), (1024, 1176))  # 4 .. 256 tokens of 4 patches
    assert vision["window_ids"] == ((4,), (128,), (256,))
    assert profiles["decoder"]["position_ids"][2][0] == 3  # M-RoPE's three rows


def test_tops_stage_ii_lam_is_the_papers_for_qwen():
    """lam2=auto: the paper's Qwen2.5-VL-7B setting (0.4) on an mrope export, LLaVA-1.5's elsewhere."""
    from tops_edge.selector import get
    from tops_edge.selector.plan import plan_for

    params = get("tops").resolve_params({})
    plan = plan_for("tops", params, 64, 391, 28)
    feeds = get("tops").cut_feeds
    assert float(feeds(params, plan, "mrope")["lam"]) == pytest.approx(0.4)
    assert float(feeds(params, plan_for("tops", params, 64, 576, 32), "single")["lam"]) == pytest.approx(1.0)


def test_eval_refuses_compact_positions(plain):
    from tops_edge.errors import InputError
    from tops_edge.eval.runner import run_eval

    with pytest.raises(InputError, match="M-RoPE"):
        run_eval(plain.directory, pipeline=plain, positions="compact", limit=1)


def test_bench_and_eval_run_unchanged(pruned):
    """tops-bench (with HF's side, fed mm_token_type_ids by the processor) and tops-eval on a Qwen
    export: the default 336 x 336 scene is 12 x 12 = 144 tokens."""
    from tops_edge.bench import run_benchmark, validate
    from tops_edge.eval.runner import run_eval

    report = run_benchmark(pruned.directory, keeps=[144, 64], runs=1, warmup=0, new_tokens=3, prompt_len=8,
                           compare="hf")
    validate(report)
    assert [b["keep"] for b in report["budgets"]] == [144, 64]
    assert report["hf"]["config_matches_export"] is True and report["hf"]["generated_tokens"] == [3]
    result = run_eval(pruned.directory, keeps=[32], limit=4, pipeline=pruned)
    assert result["settings"]["items"] == 4 and result["settings"]["positions"] == "original"
    assert result["table"]["unpruned"]["all"]["n"] == 4 and result["table"]["dpp-merge"]["32"]["all"]["n"] == 4
