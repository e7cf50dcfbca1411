"""LLaVA-NeXT (anyres): the runtime's token layout, parity with HF, per-crop and global pruning."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cli_helpers import one_line_error
from conftest import make_image
from hf_reference import hf_generate, hf_generate_from_embeds, hf_image_sequence, hf_pruned_inputs_embeds
from tops_edge.cli import export_main, run_main
from tops_edge.errors import InputError, ManifestError
from tops_edge.export import export_model
from tops_edge.export.manifest import load_manifest
from tops_edge.models import load
from tops_edge.models.tiny import build_tiny_llava
from tops_edge.runtime import Pipeline
from tops_edge.runtime.layout import layout_for, split_budget
from tops_edge.selector import keep_from_ratio

NEW_TOKENS = 12
# (width, height, seed): square, wide, tall, and the extremes where unpadding removes most rows/columns
NEXT_IMAGES = {"square": (336, 336, 3), "wide": (520, 220, 4), "tall": (230, 500, 5), "panorama": (1000, 110, 6)}


@pytest.fixture(scope="module")
def next_tiny():
    return load("tiny-llava-next")


@pytest.fixture(scope="module")
def next_images():
    return {name: make_image(*spec) for name, spec in NEXT_IMAGES.items()}


@pytest.fixture(scope="module")
def next_none(tmp_path_factory, next_tiny):
    return Pipeline.load(export_model(next_tiny, tmp_path_factory.mktemp("next") / "none", progress=False))


@pytest.fixture(scope="module")
def next_dirs(tmp_path_factory, next_tiny):
    root = tmp_path_factory.mktemp("next")
    return {
        method: export_model(next_tiny, root / method, selector=method, keep_ratio=0.222, merge="none", progress=False)
        for method in ("dpp-merge", "uniform")
    }


def test_tiny_llava_next_has_the_anyres_layout(next_tiny):
    layout = next_tiny.visual_layout()
    assert layout["layout"] == "anyres" and layout["tokens_per_crop"] == 576 and layout["grid"] == [24, 24]
    assert layout["max_selectable"] == 2880  # base + the 2x2 grid: the paper's 2880
    assert layout["max_tokens"] == 2880 + 48  # + one newline per row of the 48-row grid
    assert next_tiny.layout_arrays()["image_newline"].shape == (next_tiny.hidden_size,)


@pytest.mark.parametrize("name", list(NEXT_IMAGES))
def test_token_map_gathers_exactly_hfs_packed_sequence(next_tiny, next_images, name):
    """Our index arithmetic (crop grid, stitching, unpadding, newlines) against HF's pack_image_features."""
    model, processor = next_tiny.model, next_tiny.processor
    image = next_images[name]
    inputs = processor.image_processor(images=image, return_tensors="pt")
    layout = layout_for(next_tiny.visual_layout())
    token_map = layout.token_map(tuple(inputs["image_sizes"][0].tolist()))
    assert token_map.num_crops == inputs["pixel_values"].shape[1]
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states[-2][:, 1:]
        per_crop = model.model.multi_modal_projector(hidden).numpy()
    ours = token_map.gather(per_crop, next_tiny.layout_arrays()["image_newline"])
    ref = hf_image_sequence(model, processor, image).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    # and the processor expands the prompt's image slot to exactly that many tokens
    text = processor(images=image, text="<image>\nhi", return_tensors="pt")
    assert int((text["input_ids"] == model.config.image_token_id).sum()) == len(token_map)
    # every crop's rectangle holds exactly its tokens
    for s, (rows, cols) in enumerate(token_map.grids):
        assert (token_map.segment == s).sum() == rows * cols


@pytest.mark.parametrize("name", ["square", "wide", "tall"])
def test_greedy_token_ids_equal_hf_generate_with_selector_none(next_none, next_tiny, next_images, name):
    image, prompt = next_images[name], "What is in the picture?"
    ours = next_none.generate(image, prompt, max_new_tokens=NEW_TOKENS)
    ref = hf_generate(next_tiny.model, next_tiny.processor, image, prompt, NEW_TOKENS)
    assert len(ours.token_ids) == NEW_TOKENS
    assert ours.token_ids == ref
    assert ours.num_visual_tokens == len(ours.kept_indices) == len(hf_image_sequence(next_tiny.model, next_tiny.processor, image))


def test_local_next_checkpoint_with_other_config_matches_hf(tmp_path, next_images):
    """A saved LLaVA-NeXT unlike the built-in one: 224px/16 crops (196 tokens), other pinpoints
    (up to a 3x1 grid), the last vision layer, MHA, 3 text layers."""
    model, processor = build_tiny_llava(
        seed=11,
        next_config=True,
        vision=dict(image_size=224, patch_size=16, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3),
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6,
                  max_position_embeddings=4096),
        vision_feature_layer=-1,
        image_grid_pinpoints=[[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]],
    )
    processor.image_processor.image_grid_pinpoints = model.config.image_grid_pinpoints
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)

    adapter = load(str(ckpt))
    assert adapter.family == "llava_next" and adapter.visual_layout()["tokens_per_crop"] == 196
    out = export_model(str(ckpt), tmp_path / "export", progress=False)
    pipe = Pipeline.load(out)
    reloaded = type(model).from_pretrained(ckpt).eval()
    for name in ("wide", "tall", "panorama"):
        ours = pipe.generate(next_images[name], "Describe it.", max_new_tokens=NEW_TOKENS)
        ref = hf_generate(reloaded, processor, next_images[name], "Describe it.", NEW_TOKENS)
        assert ours.token_ids == ref, name


@pytest.mark.parametrize("method", ["dpp-merge", "uniform"])
@pytest.mark.parametrize("budget", ["proportional", "global"])
def test_pruned_pipeline_equals_hf_fed_the_same_kept_tokens(next_dirs, next_tiny, next_images, method, budget):
    pipe = Pipeline.load(next_dirs[method])
    image, prompt = next_images["wide"], "Is there a red circle?"
    ours = pipe.generate(image, prompt, max_new_tokens=NEW_TOKENS, budget=budget)
    selectable, total = pipe.visual_tokens(image)
    assert ours.keep == keep_from_ratio(0.222, selectable) < selectable
    embeds = hf_pruned_inputs_embeds(next_tiny.model, next_tiny.processor, image, prompt, ours.kept_indices)
    assert embeds.shape[1] == ours.prompt_tokens
    assert ours.token_ids == hf_generate_from_embeds(next_tiny.model, embeds, NEW_TOKENS)


def test_newlines_are_always_kept_and_crops_get_proportional_shares(next_dirs, next_tiny, next_images):
    pipe = Pipeline.load(next_dirs["dpp-merge"])
    image = next_images["tall"]
    token_map = pipe.layout.token_map(pipe.pre.image_inputs(image)[1])
    counts = [int((token_map.segment == s).sum()) for s in range(len(token_map.grids))]
    for budget in ("proportional", "global"):
        result = pipe.generate(image, "What is it?", max_new_tokens=2, keep=300, budget=budget)
        kept = np.asarray(result.kept_indices)
        assert set(token_map.newlines.tolist()) <= set(kept.tolist())
        assert len(kept) == 300 + len(token_map.newlines) and np.all(np.diff(kept) > 0)
        per_segment = [int((token_map.segment[kept] == s).sum()) for s in range(len(counts))]
        if budget == "proportional":
            assert per_segment == split_budget(300, counts)
        else:
            assert sum(per_segment) == 300
    # the two modes select differently on this image (global may favour one crop)
    a = pipe.generate(image, "What is it?", max_new_tokens=1, keep=300, budget="proportional").kept_indices
    b = pipe.generate(image, "What is it?", max_new_tokens=1, keep=300, budget="global").kept_indices
    assert a != b


def test_kv_cache_bytes_ratio_is_exact(next_dirs, next_images):
    pipe = Pipeline.load(next_dirs["dpp-merge"])
    image = next_images["square"]
    selectable, total = pipe.visual_tokens(image)
    full = pipe.generate(image, "Describe.", max_new_tokens=4, keep=selectable, ignore_eos=True)
    pruned = pipe.generate(image, "Describe.", max_new_tokens=4, keep_ratio=0.222, ignore_eos=True)
    text = full.prompt_tokens - total
    kept = pruned.keep + (total - selectable)  # newlines ride along
    assert Fraction(pruned.kv_cache_bytes, full.kv_cache_bytes) == Fraction(text + kept + 3, text + total + 3)


def test_keep_ratio_matches_the_papers_setting():
    assert keep_from_ratio(0.222, 2880) == 640
    assert keep_from_ratio(0.222, 576) == 128
    assert keep_from_ratio(0.3, 10) == 3 and keep_from_ratio(1e-9, 576) == 1 and keep_from_ratio(1.0, 576) == 576
    for bad in (0, -0.5, 1.5, float("nan"), "x", True):
        with pytest.raises(InputError):
            keep_from_ratio(bad, 576)


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 600), min_size=1, max_size=6), frac=st.floats(0, 1))
def test_split_budget_sums_to_k_within_counts_and_is_proportional(counts, frac):
    keep = int(frac * sum(counts))
    shares = split_budget(keep, counts)
    assert sum(shares) == keep
    for share, count in zip(shares, counts):
        assert 0 <= share <= count
        assert abs(share - keep * count / max(sum(counts), 1)) < 1


def test_cli_runs_next_with_keep_ratio_and_budget(next_dirs, tmp_path, capsys):
    import json

    path = tmp_path / "wide.png"
    make_image(*NEXT_IMAGES["wide"]).save(path)
    code = run_main([str(next_dirs["dpp-merge"]), "--image", str(path), "--prompt", "Hi?", "--keep-ratio", "0.111",
                     "--budget", "global", "--max-new-tokens", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    selectable, total = Pipeline.load(next_dirs["dpp-merge"]).visual_tokens(path)
    assert out["num_visual_tokens"] == total
    assert out["keep"] == keep_from_ratio(0.111, selectable)
    assert len(out["kept_indices"]) == out["keep"] + total - selectable  # + the row newlines


def test_cli_keep_beyond_this_images_tokens_fails_with_one_line(next_dirs, tmp_path, capsys):
    path = tmp_path / "square.png"
    make_image(*NEXT_IMAGES["square"]).save(path)
    code = run_main([str(next_dirs["dpp-merge"]), "--image", str(path), "--prompt", "Hi?", "--keep", "2000"])
    line = one_line_error(capsys, code)
    assert "--keep 2000 is out of range: this image has 1152 visual tokens" in line
    code = run_main([str(next_dirs["dpp-merge"]), "--image", str(path), "--prompt", "Hi?", "--keep", "5000"])
    assert "at most 2880" in one_line_error(capsys, code)
    code = run_main([str(next_dirs["dpp-merge"]), "--image", str(path), "--prompt", "Hi?", "--keep-ratio", "0"])
    assert "--keep-ratio" in one_line_error(capsys, code)
    code = export_main(["--model", "tiny-llava-next", "--out", str(tmp_path / "x"), "--selector", "dpp-merge", "--keep", "4000"])
    assert "out of range" in one_line_error(capsys, code) and not (tmp_path / "x").exists()


def test_a_modified_newline_array_is_refused(next_dirs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(next_dirs["uniform"], copy)
    manifest = load_manifest(copy)
    path = copy / manifest["arrays"]["image_newline"]["path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(copy)


def test_bench_counts_the_bench_images_tokens_and_compares_with_hf(next_dirs):
    from tops_edge.bench import run_benchmark

    report = run_benchmark(next_dirs["dpp-merge"], runs=1, warmup=0, new_tokens=2, prompt_len=8, compare="hf")
    d = report["device"]
    # the synthetic 336x336 scene takes a 1x2 crop grid: 576 + 2 x 288 tokens, plus 24 row newlines
    assert (d["num_visual_tokens"], d["num_visual_tokens_total"]) == (1152, 1176)
    assert [b["keep"] for b in report["budgets"]] == [1152, 576, 192, 128, 64]
    kv = [b["kv_cache_bytes"] for b in report["budgets"]]
    assert kv == sorted(kv, reverse=True)
    assert all(b["hf_e2e_ratio"] is not None for b in report["budgets"])


@pytest.mark.parametrize("method", ["cdpruner", "divprune", "attention", "random"])
def test_every_selector_prunes_next_images_in_both_budget_modes(tmp_path, next_tiny, next_images, method):
    """The inputs each method reads (vision features, [CLS] attention, the instruction) are gathered
    per segment; the result keeps K patch tokens plus every newline, and equals HF fed those tokens."""
    pipe = Pipeline.load(export_model(next_tiny, tmp_path / method, selector=method, keep=200, merge="none",
                                      progress=False))
    image, prompt = next_images["tall"], "What colour is it?"
    token_map = pipe.layout.token_map(pipe.pre.image_inputs(image)[1])
    for budget in ("proportional", "global"):
        r = pipe.generate(image, prompt, max_new_tokens=4, budget=budget)
        kept = np.asarray(r.kept_indices)
        assert r.keep == 200 and len(kept) == 200 + len(token_map.newlines)
        assert set(token_map.newlines.tolist()) <= set(kept.tolist()) and np.all(np.diff(kept) > 0)
    embeds = hf_pruned_inputs_embeds(next_tiny.model, next_tiny.processor, image, prompt, r.kept_indices)
    assert r.token_ids == hf_generate_from_embeds(next_tiny.model, embeds, 4)


def test_next_with_a_mistral_language_model_matches_hf(tmp_path, next_images):
    """llava-v1.6-mistral-7b's shape: the same anyres vision side, a Mistral LLM."""
    from transformers import LlavaNextForConditionalGeneration, MistralConfig

    from tops_edge.models.llava_next import LlavaNextAdapter
    from tops_edge.models.tiny import build_byte_tokenizer, build_processor, tiny_llava_config

    tokenizer = build_byte_tokenizer(4096)
    config = tiny_llava_config(tokenizer, next_config=True, text=dict(max_position_embeddings=4096))
    known = MistralConfig().to_dict()
    text = {k: v for k, v in config.text_config.to_dict().items() if k in known and k not in ("model_type", "architectures")}
    config.text_config = MistralConfig(**text, sliding_window=None)
    torch.manual_seed(3)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = build_processor(tokenizer, 336, 14, "default", config.image_grid_pinpoints)
    assert type(model.model.language_model).__name__ == "MistralModel"
    pipe = Pipeline.load(export_model(LlavaNextAdapter(model, processor, "tiny-mistral"), tmp_path / "m", progress=False))
    image = next_images["wide"]
    assert pipe.generate(image, "What?", max_new_tokens=NEW_TOKENS).token_ids == hf_generate(model, processor, image, "What?", NEW_TOKENS)


def test_tensorrt_profiles_cover_every_next_image(next_dirs):
    """tops-build's profiles for an anyres export: 1..5 crops into the vision engine, 1..2880 tokens
    into the selector, prefill up to the longest sequence (2928 visual tokens)."""
    from tops_edge.plan import get_preset
    from tops_edge.plan.profiles import optimization_profiles

    profiles = optimization_profiles(load_manifest(next_dirs["uniform"]), get_preset("agx-orin"))
    lo, opt, hi = profiles["vision"]["pixel_values"]
    assert (lo[0], hi[0]) == (1, 5) and lo[1:] == hi[1:] == (3, 336, 336)
    lo, _, hi = profiles["selector"]["image_features"]
    assert (lo[1], hi[1]) == (1, 2880)
    assert profiles["selector"]["keep"][2] == (2880,)
    assert profiles["decoder"]["inputs_embeds"][2][1] >= 2928


def test_merge_stays_within_each_crops_share_and_accounts_for_every_token(tmp_path, next_tiny, next_images):
    """merge=mean on an anyres image: each kept token stands for a group of its own crop (proportional)
    or of the whole image (global); together the groups cover every selectable token once, and the
    newlines stand for themselves."""
    pipe = Pipeline.load(export_model(next_tiny, tmp_path / "merge", selector="dpp-merge", keep=200, progress=False))
    assert pipe.merge == "mean"
    image = next_images["tall"]
    token_map = pipe.layout.token_map(pipe.pre.image_inputs(image)[1])
    for budget in ("proportional", "global"):
        r = pipe.generate(image, "What colour is it?", max_new_tokens=2, budget=budget)
        sizes = dict(zip(r.kept_indices, r.kept_sizes))
        assert sum(sizes.values()) == len(token_map)
        assert all(sizes[int(i)] == 1 for i in token_map.newlines)
        if budget == "proportional":
            for s in range(len(token_map.grids)):
                members = set(np.flatnonzero(token_map.segment == s).tolist())
                assert sum(n for i, n in sizes.items() if i in members) == len(members)
