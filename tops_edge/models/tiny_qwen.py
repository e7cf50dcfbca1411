"""The built-in tiny Qwen2.5-VL: random weights from a fixed seed, built in code, no download.

It keeps what the pipeline depends on from the real model: the ViT's 14px patches over 2 frames,
its 2x2 patch merger, window attention (112px windows) with full-attention blocks between, 2D rotary
in the tower, M-RoPE in a Qwen2 LLM with grouped KV heads, the `<|vision_start|><|image_pad|>
<|vision_end|>` prompt and the image processor's dynamic resolution; everything else is shrunk.

transformers' Qwen processors cannot be built from a saved folder on machines without torchvision
(their video processor needs it), so `load_qwen_processor` builds one from the PIL image processor and
the tokenizer, which is all an image prompt uses.
"""

from __future__ import annotations

import torch

from ..runtime.qwen_processor import QWEN_IMAGE_TOKEN, QwenVLProcessor, load_qwen_processor, qwen_processor  # noqa: F401

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]

# Qwen2.5-VL's chat template (the published one, less its video and vision-id branches)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: the tiny model's image processor caps: 56x56 .. 448x448 pixels (16 .. 1024 patches, 4 .. 256 tokens)
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 448 * 448

#: size overrides of the built-in tiny Qwen2.5-VL models by name
TINY_QWEN_SIZES = {"tiny-qwen2.5-vl": {}}


def build_qwen_byte_tokenizer(model_max_length: int = 4096):
    """A byte-level tokenizer with Qwen's special tokens and chat template (no BOS, as Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def tiny_qwen_config(tokenizer, **overrides):
    """A Qwen2_5_VLConfig with tiny sizes (`vision=` / `text=` dicts update the sub-configs)."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3],
                  out_hidden_size=64, tokens_per_second=2)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        # head_dim 16: the M-RoPE sections (temporal, height, width) split its 8 frequencies
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        initializer_range=0.2,  # keeps greedy logits apart, so parity is not decided by ties
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return qwen_family_config(Qwen2_5_VLConfig, tokenizer, vision, text, overrides)


def qwen_family_config(config_class, tokenizer, vision: dict, text: dict, overrides: dict):
    """A Qwen-VL config (2.5 or 3) from default vision / text dicts, updated by `overrides` (its
    `vision=` / `text=` dicts update the sub-configs), with the tokenizer's special-token ids."""
    vision = dict(vision, **overrides.pop("vision", {}))
    text = dict(text, **overrides.pop("text", {}))
    ids = tokenizer.convert_tokens_to_ids
    cfg = dict(vision_config=vision, text_config=text, image_token_id=ids(QWEN_IMAGE_TOKEN),
               video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
               vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    cfg.update(overrides)
    return config_class(**cfg)


def build_qwen_image_processor(min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS,
                               patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2, **normalise):
    """The PIL Qwen2-VL image processor with these caps (`normalise`: image_mean / image_std)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                    patch_size=patch_size, merge_size=merge_size,
                                    temporal_patch_size=temporal_patch_size, **normalise)


def build_tiny_qwen(seed: int = 0, **overrides):
    """(model, processor) of a random Qwen2.5-VL in miniature. Same seed -> same weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen_byte_tokenizer()
    caps = overrides.pop("pixels", {})
    return build_random_qwen(Qwen2_5_VLForConditionalGeneration, tiny_qwen_config(tokenizer, **overrides), tokenizer,
                             seed, caps)


def build_random_qwen(model_class, config, tokenizer, seed: int, caps: dict, chat_template: str | None = None,
                      **normalise):
    """(model, processor): `model_class(config)` with weights from `seed`, and a processor whose image
    processor follows the config's patch, merge and temporal sizes (`caps`: min_pixels / max_pixels)."""
    from transformers import GenerationConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    vc = config.vision_config
    image_processor = build_qwen_image_processor(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                                 temporal_patch_size=vc.temporal_patch_size, **caps, **normalise)
    return model, qwen_processor(image_processor, tokenizer, chat_template)
