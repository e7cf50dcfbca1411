"""The built-in tiny Qwen3-VL: random weights from a fixed seed, built in code, no download.

It keeps what the pipeline depends on from the real model: the ViT's 16px patches over 2 frames,
its 2x2 patch merger, full attention in every block with 2D (axial) rotary, the learned absolute
position embedding bilinearly resampled from a square table to each image's grid, the DeepStack
mergers (three intermediate ViT blocks, each merged to the LLM width and added to the hidden states
of the first three LLM layers at the image positions), interleaved M-RoPE in a Qwen3 LLM (q/k
RMSNorm, grouped KV heads), the `<|vision_start|><|image_pad|><|vision_end|>` prompt and the image
processor's dynamic resolution (32 px per merged token); everything else is shrunk.

Preprocessing is Qwen2.5-VL's (tops_edge.runtime.qwen_processor.QwenVLProcessor): HF's
Qwen3VLProcessor emits the same tensors for image prompts (input_ids, attention_mask,
mm_token_type_ids, pixel_values, image_grid_thw; each `<|image_pad|>` expanded to t*h*w / merge^2
tokens; its timestamp logic is for videos only) over the same PIL image processor class
(transformers maps `qwen3_vl` to Qwen2VLImageProcessor). What differs is configuration: patch 16
(not 14), image mean/std 0.5 (not CLIP's), and the chat template (Qwen3-VL's has no default system
message).
"""

from __future__ import annotations

from .tiny_qwen import build_qwen_byte_tokenizer, build_qwen_image_processor, build_random_qwen, qwen_family_config

# Qwen3-VL-Instruct's chat template less its tool, video and vision-id branches: unlike Qwen2.5-VL's
# there is no default system message (a system turn is written only when the conversation has one)
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
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

#: Qwen3-VL's image normalisation (its preprocessor_config.json: mean = std = 0.5 per channel)
QWEN3_IMAGE_MEAN = QWEN3_IMAGE_STD = (0.5, 0.5, 0.5)

#: the tiny model's image processor caps: 64x64 .. 512x512 pixels (16 .. 1024 patches, 4 .. 256 tokens)
TINY3_MIN_PIXELS = 64 * 64
TINY3_MAX_PIXELS = 512 * 512

#: size overrides of the built-in tiny Qwen3-VL models by name
TINY_QWEN3_SIZES = {"tiny-qwen3-vl": {}}


def tiny_qwen3_config(tokenizer, **overrides):
    """A Qwen3VLConfig with tiny sizes (`vision=` / `text=` dicts update the sub-configs)."""
    from transformers import Qwen3VLConfig

    vision = dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, hidden_act="gelu_pytorch_tanh",
        # an 8 x 8 learned position table (the real models: 48 x 48 = 2304), resampled to every grid
        num_position_embeddings=64,
        # three DeepStack taps before the last block, as the real ones ([5, 11, 17] of 24, [8, 16, 24] of 27)
        deepstack_visual_indexes=[0, 1, 2],
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        # head_dim 16 -> 8 frequencies. Qwen3-VL interleaves them (H at 1, 4, .., W at 2, 5, .., T the
        # rest): sections [4, 2, 2] give H {1, 4}, W {2, 5}, T {0, 3, 6, 7}, as [24, 20, 20] does at 64
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
        initializer_range=0.2,  # keeps greedy logits apart, so parity is not decided by ties
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return qwen_family_config(Qwen3VLConfig, tokenizer, vision, text, overrides)


def build_qwen3_image_processor(min_pixels: int = TINY3_MIN_PIXELS, max_pixels: int = TINY3_MAX_PIXELS,
                                patch_size: int = 16, merge_size: int = 2, temporal_patch_size: int = 2):
    return build_qwen_image_processor(min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size,
                                      image_mean=list(QWEN3_IMAGE_MEAN), image_std=list(QWEN3_IMAGE_STD))


def build_qwen3_tokenizer(model_max_length: int = 4096):
    """The byte-level Qwen tokenizer of tiny_qwen with Qwen3-VL's chat template."""
    tokenizer = build_qwen_byte_tokenizer(model_max_length)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen3(seed: int = 0, **overrides):
    """(model, processor) of a random Qwen3-VL in miniature. Same seed -> same weights.
    `pixels={"min_pixels": .., "max_pixels": ..}` changes the image processor's caps."""
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = build_qwen3_tokenizer()
    caps = dict(dict(min_pixels=TINY3_MIN_PIXELS, max_pixels=TINY3_MAX_PIXELS), **overrides.pop("pixels", {}))
    return build_random_qwen(Qwen3VLForConditionalGeneration, tiny_qwen3_config(tokenizer, **overrides), tokenizer,
                             seed, caps, QWEN3_CHAT_TEMPLATE, image_mean=list(QWEN3_IMAGE_MEAN),
                             image_std=list(QWEN3_IMAGE_STD))
