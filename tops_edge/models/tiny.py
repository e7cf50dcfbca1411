"""Built-in tiny models: random weights from a fixed seed, built in code, no download.

They keep the real models' shapes where they matter to the pipeline (CLIP 336px/14 -> 576 visual
tokens, Llama with grouped KV heads, LLaVA-1.5's chat template) and shrink everything else.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaVA-1.5's template (llava-hf), without the training-only generation markers.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_byte_tokenizer(model_max_length: int = 2048):
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, plus the specials.

    Deterministic, covers any text, needs no training data; BOS is added like Llama's tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=model_max_length,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


def build_word_tokenizer(words, model_max_length: int = 2048):
    """A word-level tokenizer for a closed vocabulary (e.g. ShapesVQA's): lower-cased words and
    punctuation marks are tokens, anything else <unk>; BOS added, the LLaVA chat template set.
    One token per word keeps a tiny LLM's job to binding words to image regions, not spelling."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted({w.lower() for w in words} - set(vocab)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=model_max_length,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


def tiny_llava_config(tokenizer, next_config: bool = False, **overrides):
    """A LlavaConfig (or LlavaNextConfig with `next_config`) with tiny sizes, updated by `overrides`
    (`vision=`/`text=` dicts update the sub-configs)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = dict(
        image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        # a wider init than Llama's 0.02 keeps greedy logits apart, so parity is not decided by ties
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5,
    )
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    cfg = dict(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )
    if next_config:
        cfg["image_grid_pinpoints"] = [list(p) for p in NEXT_PINPOINTS]
        cfg["image_seq_length"] = (vision["image_size"] // vision["patch_size"]) ** 2
    cfg.update(overrides)
    return (LlavaNextConfig if next_config else LlavaConfig)(**cfg)


def build_processor(tokenizer, image_size: int, patch_size: int, strategy: str, pinpoints=None):
    """LLaVA-1.5's processor, or LLaVA-NeXT's anyres one when `pinpoints` (the grid resolutions) are given."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    sizes = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    if pinpoints is not None:
        processor_class = LlavaNextProcessor
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=[list(p) for p in pinpoints], **sizes)
    else:
        processor_class, image_processor = LlavaProcessor, CLIPImageProcessorPil(**sizes)
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


#: size overrides of the built-in tiny models by name; "medium" is the benchmark model (big enough
#: that graph work, not Python, dominates: vision 4 x 256, Llama 4 x 512 with grouped KV heads)
TINY_SIZES = {
    "tiny-llava": {},
    "tiny-llava-medium": dict(
        vision=dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
        text=dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1376),
    ),
}


#: LLaVA-NeXT's default anyres resolutions (llava-v1.6), (height, width) in pixels
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

#: the built-in LLaVA-NeXT: a context long enough for 5 crops unpruned (up to 2928 visual tokens)
TINY_NEXT_SIZES = {"tiny-llava-next": dict(text=dict(max_position_embeddings=4096))}


def build_tiny_llava(seed: int = 0, next_config: bool = False, **overrides):
    """(model, processor) of a random LLaVA-1.5 (or LLaVA-NeXT) in miniature. Same seed -> same weights."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    context = overrides.get("text", {}).get("max_position_embeddings", 2048)
    tokenizer = build_byte_tokenizer(model_max_length=context)
    config = tiny_llava_config(tokenizer, next_config=next_config, **overrides)
    model_class = LlavaNextForConditionalGeneration if next_config else LlavaForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vc = config.vision_config
    pinpoints = getattr(config, "image_grid_pinpoints", None) if next_config else None
    processor = build_processor(tokenizer, vc.image_size, vc.patch_size, config.vision_feature_select_strategy, pinpoints)
    return model, processor
