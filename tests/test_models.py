"""How --model strings resolve: built-in, alias, local directory, hub id in the HF cache."""

from __future__ import annotations

import pytest

from tops_edge.errors import ModelNotFoundError, UnsupportedModelError
from tops_edge.models import aliases, load
from tops_edge.models.tiny import build_tiny_llava


def test_tiny_llava_is_deterministic_and_has_llava15_shapes():
    a, b = load("tiny-llava"), load("tiny-llava")
    layout = a.visual_layout()
    assert layout["tokens_per_crop"] == 576 and layout["layout"] == "single" and layout["grid"] == [24, 24]
    assert a.num_kv_heads < a.text_config.num_attention_heads  # grouped KV heads
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert pa.equal(pb), name


def test_aliases_name_the_llava_hf_checkpoints():
    assert aliases()["llava-v1.5-7b"] == "llava-hf/llava-1.5-7b-hf"
    assert aliases()["llava-v1.5-13b"] == "llava-hf/llava-1.5-13b-hf"


def test_hub_id_loads_from_the_hf_cache_offline(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout, with downloads off."""
    import huggingface_hub.constants as hf_constants

    model, processor = build_tiny_llava(seed=3)
    snapshot = tmp_path / "hub" / "models--someorg--tiny-llava-test" / "snapshots" / "0123abcd"
    model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123abcd")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    adapter = load("someorg/tiny-llava-test")
    assert adapter.source == "someorg/tiny-llava-test"
    assert adapter.model.state_dict()["lm_head.weight"].equal(model.state_dict()["lm_head.weight"])


def test_hub_id_not_in_cache_names_the_model_and_how_to_get_it():
    with pytest.raises(ModelNotFoundError) as err:
        load("llava-v1.5-13b")
    assert "llava-hf/llava-1.5-13b-hf" in str(err.value) and "hf download" in str(err.value)


def test_directory_without_weights_is_refused(tmp_path):
    model, _ = build_tiny_llava()
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load(str(tmp_path))


def test_unsupported_model_type_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="llama"):
        load(str(tmp_path))


def test_export_attention_equals_hf_eager_attention_with_grouped_heads():
    """The decoder is traced with grouped_attention (no repeated KV); it must compute what HF's
    eager attention computes, causal mask and padded keys included."""
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from tops_edge.models.base import additive_causal_mask, grouped_attention

    torch.manual_seed(0)
    heads, kv_heads, dim, past, seq = 8, 2, 16, 5, 4
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = heads // kv_heads, False
    q = torch.randn(1, heads, seq, dim)
    k, v = torch.randn(1, kv_heads, past + seq, dim), torch.randn(1, kv_heads, past + seq, dim)
    padding = torch.ones(1, past + seq, dtype=torch.int64)
    padding[0, 1] = 0  # a padded key
    mask = additive_causal_mask(padding, seq)
    assert mask.shape == (1, 1, seq, past + seq)
    allowed = mask[0, 0] == 0
    expected_allowed = torch.tensor([[j <= past + i and j != 1 for j in range(past + seq)] for i in range(seq)])
    assert torch.equal(allowed, expected_allowed)
    ours, _ = grouped_attention(module, q, k, v, mask, scaling=dim**-0.5)
    theirs, _ = eager_attention_forward(module, q, k, v, mask, scaling=dim**-0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_download_sizes_match_the_checkpoints_parameter_counts():
    """The size a first download announces is the architecture's own parameter count in fp16."""
    from tops_edge.models import download_size
    from tops_edge.models.architecture import KNOWN_CONFIGS, load_architecture

    for hub_id in KNOWN_CONFIGS:
        params = sum(p.numel() for p in load_architecture(hub_id).model.parameters()) / 1e9
        assert download_size(hub_id) == f"about {params * 2:.1f} GB: {params:.2f}B parameters in fp16"
    assert download_size("someorg/unknown") is None


def test_a_missing_known_checkpoint_says_how_big_the_download_is():
    with pytest.raises(ModelNotFoundError) as err:
        load("llava-v1.5-7b")
    assert "`hf download llava-hf/llava-1.5-7b-hf` (about 14.1 GB: 7.06B parameters in fp16)" in str(err.value)


def test_the_decoder_part_uses_transformers_current_cache_argument(tiny):
    """transformers 5.24 renamed `past_key_values=` to `cache=` (the old name goes in 5.40): the
    decoder part that is traced for export passes whichever the installed version takes, so running
    it warns about neither."""
    import warnings

    import torch

    decoder = next(p for p in tiny.parts() if p.name == "decoder")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        decoder.module(*decoder.example_inputs())
    assert not [w for w in caught if "past_key_values" in str(w.message)]
