"""The ONNX Runtime pipeline against HF transformers on the same weights."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import DynamicCache

from hf_reference import (chat_text, hf_generate, hf_generate_from_embeds, hf_greedy_with_bias, hf_merged_inputs,
                          hf_pruned_inputs_embeds)
from tops_edge.export import export_model
from tops_edge.models import load
from tops_edge.models.base import cache_argument
from tops_edge.models.tiny import build_tiny_llava
from tops_edge.runtime import Pipeline

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def pipe_none(tiny_none_dir):
    return Pipeline.load(tiny_none_dir)


@pytest.mark.parametrize("image_name", ["wide", "tall", "square"])
@pytest.mark.parametrize("prompt_index", [0, 1, 2])
def test_greedy_token_ids_equal_hf_generate_with_selector_none(pipe_none, tiny, images, image_name, prompt_index):
    from conftest import PROMPTS

    image, prompt = images[image_name], PROMPTS[prompt_index]
    ours = pipe_none.generate(image, prompt, max_new_tokens=NEW_TOKENS)
    ref = hf_generate(tiny.model, tiny.processor, image, prompt, NEW_TOKENS)
    assert len(ours.token_ids) >= 12
    assert ours.token_ids == ref
    assert ours.kept_indices == list(range(576))


def test_local_checkpoint_with_other_config_matches_hf(tmp_path, images):
    """A saved directory whose config differs from the built-in one on every axis the adapter reads:
    224px/16 (196 tokens), [CLS] kept (strategy full), last layer, MHA instead of GQA, 3 layers."""
    model, processor = build_tiny_llava(
        seed=7,
        vision=dict(image_size=224, patch_size=16, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3),
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
    )
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)

    adapter = load(str(ckpt))
    assert adapter.visual_layout()["tokens_per_crop"] == 197
    out = export_model(str(ckpt), tmp_path / "export", progress=False)
    pipe = Pipeline.load(out)
    reloaded = type(model).from_pretrained(ckpt).eval()
    for name, prompt in [("wide", "What is this?"), ("tall", "Describe it.")]:
        ours = pipe.generate(images[name], prompt, max_new_tokens=NEW_TOKENS)
        ref = hf_generate(reloaded, processor, images[name], prompt, NEW_TOKENS)
        assert len(ours.token_ids) >= 12
        assert ours.token_ids == ref
        assert ours.prompt_tokens == len(processor.tokenizer(chat_text(processor, prompt)).input_ids) - 1 + 197


def test_decoder_logits_within_1e4_of_hf_at_prefill_and_decode(tiny, tiny_none_dir, images):
    model, processor = tiny.model, tiny.processor
    embeds = hf_pruned_inputs_embeds(model, processor, images["square"], "What is in the picture?", list(range(576)))
    sess = ort.InferenceSession(str(tiny_none_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    n_layers, h, d = tiny.num_layers, tiny.num_kv_heads, tiny.head_dim
    capacity = embeds.shape[1] + 3 + 5  # a fixed-size cache with slots to spare (masked out)
    past = [np.zeros((1, h, capacity, d), np.float32) for _ in range(2 * n_layers)]
    cache = DynamicCache()
    step_embeds, pos = embeds, 0
    worst = 0.0
    for _ in range(4):  # prefill, then three decode steps on the greedy token
        seq = step_embeds.shape[1]
        filled = np.zeros((1, capacity), np.int64)
        filled[0, : pos + seq] = 1
        feeds = {
            "inputs_embeds": step_embeds.numpy(),
            "attention_mask": filled,
            "attention_bias": np.zeros((1, capacity), np.float32),
            "position_ids": np.arange(pos, pos + seq, dtype=np.int64)[None],
            "cache_position": np.arange(pos, pos + seq, dtype=np.int64),
        }
        feeds.update({f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": t for i, t in enumerate(past)})
        logits, *present = sess.run(None, feeds)
        for buffer, rows in zip(past, present):  # present: only this step's rows, written at its slots
            assert rows.shape == (1, h, seq, d)
            buffer[:, :, pos : pos + seq] = rows
        with torch.no_grad():
            ref = model(inputs_embeds=step_embeds, use_cache=True, **{cache_argument(model): cache},
                        position_ids=torch.arange(pos, pos + seq)[None]).logits[:, -1]
        for i, layer in enumerate(cache.layers):  # the cache the runtime builds from present is HF's
            np.testing.assert_allclose(past[2 * i][:, :, : pos + seq], layer.keys.numpy(), rtol=0, atol=1e-5)
            np.testing.assert_allclose(past[2 * i + 1][:, :, : pos + seq], layer.values.numpy(), rtol=0, atol=1e-5)
        worst = max(worst, float(np.abs(logits[:, 0] - ref.numpy()).max()))
        pos += seq
        with torch.no_grad():
            step_embeds = model.get_input_embeddings()(ref.argmax(-1, keepdim=True))
    assert worst < 1e-4


@pytest.mark.parametrize("merge", ["none", "mean"])
@pytest.mark.parametrize("image_name", ["wide", "square"])
def test_uniform_k64_pipeline_equals_hf_fed_the_same_pruned_embeds(pipe_uniform, tiny, images, image_name, merge):
    """merge=none: HF generate on the kept tokens. merge=mean: HF's forward on the merged tokens with
    log(group size) added to their attention logits (a 4D mask HF takes as given)."""
    from tops_edge.selector.uniform import UniformGrid

    prompt = "What is in the picture?"
    before, pipe_uniform.merge = pipe_uniform.merge, merge
    try:
        ours = pipe_uniform.generate(images[image_name], prompt, max_new_tokens=NEW_TOKENS, keep=64)
    finally:
        pipe_uniform.merge = before
    expected_kept = UniformGrid(24, 24).indices(torch.tensor(64)).tolist()
    assert ours.kept_indices == expected_kept
    plain = hf_pruned_inputs_embeds(tiny.model, tiny.processor, images[image_name], prompt, ours.kept_indices)
    assert ours.prompt_tokens == plain.shape[1]
    if merge == "none":
        ref = hf_generate_from_embeds(tiny.model, plain, NEW_TOKENS)
    else:
        embeds, bias = hf_merged_inputs(tiny.model, tiny.processor, images[image_name], prompt, ours.kept_indices)
        assert bias.max() > 1.5  # uniform K=64 of 576: groups of about 9 tokens
        ref = hf_greedy_with_bias(tiny.model, embeds, bias, NEW_TOKENS)
        assert ref != hf_generate_from_embeds(tiny.model, plain, NEW_TOKENS)  # merging changed the answer
    assert len(ours.token_ids) >= 12
    assert ours.token_ids == ref


def test_kv_cache_bytes_ratio_k64_vs_unpruned_equals_sequence_length_ratio(pipe_uniform, images):
    from fractions import Fraction

    full = pipe_uniform.generate(images["wide"], "Describe it.", max_new_tokens=8, keep=576)
    pruned = pipe_uniform.generate(images["wide"], "Describe it.", max_new_tokens=8, keep=64)
    cached = lambda r: r.prompt_tokens + len(r.token_ids) - 1  # noqa: E731  (the last token is never fed back)
    assert full.prompt_tokens - pruned.prompt_tokens == 576 - 64
    assert Fraction(pruned.kv_cache_bytes, full.kv_cache_bytes) == Fraction(cached(pruned), cached(full))
    per_token = 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head_dim x fp32
    assert pruned.kv_cache_bytes == per_token * cached(pruned)


def test_dynamo_exporter_pipeline_gives_the_same_tokens_as_legacy(tiny, pipe_none, tmp_path, images):
    out = export_model(tiny, tmp_path / "dynamo", selector="none", exporter="dynamo", progress=False)
    assert Pipeline.load(out).manifest["exporter"] == "dynamo"
    ours = Pipeline.load(out).generate(images["wide"], "What is in the picture?", max_new_tokens=NEW_TOKENS)
    assert ours.token_ids == pipe_none.generate(images["wide"], "What is in the picture?", max_new_tokens=NEW_TOKENS).token_ids
