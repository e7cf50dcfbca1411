"""HF transformers references, computed with HF's own code paths (never our wrappers)."""

from __future__ import annotations

import torch


def chat_text(processor, prompt: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@torch.no_grad()
def hf_generate(model, processor, image, prompt: str, max_new_tokens: int) -> list[int]:
    """`LlavaForConditionalGeneration.generate` on the processor's output: greedy new token ids."""
    inputs = processor(images=image, text=chat_text(processor, prompt), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@torch.no_grad()
def hf_image_sequence(model, processor, image) -> torch.Tensor:
    """[T, D]: the image's visual tokens as HF's `get_image_features` lays them out (LLaVA-NeXT:
    base view, stitched and unpadded crops, row newlines)."""
    cfg = model.config
    inputs = processor.image_processor(images=image, return_tensors="pt")  # + image_sizes for NeXT
    return model.model.get_image_features(
        **inputs,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    ).pooler_output[0]


@torch.no_grad()
def hf_pruned_inputs_embeds(model, processor, image, prompt: str, kept: list[int]) -> torch.Tensor:
    """The prompt's embeddings with HF's image features at `kept` spliced into the image slot."""
    cfg = model.config
    ids = processor.tokenizer(chat_text(processor, prompt), return_tensors="pt").input_ids
    feats = hf_image_sequence(model, processor, image)
    slot = int((ids[0] == cfg.image_token_id).nonzero()[0, 0])
    text = model.get_input_embeddings()(ids)
    return torch.cat([text[:, :slot], feats[kept].unsqueeze(0), text[:, slot + 1 :]], dim=1)


@torch.no_grad()
def hf_generate_from_embeds(model, inputs_embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
    """HF generate fed the given inputs_embeds (positions 0..L-1: the compact convention)."""
    mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
    out = model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0].tolist()


@torch.no_grad()
def hf_greedy_with_positions(model, inputs_embeds: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                             eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with HF's forward and cache, fed explicit position ids (the `original`
    convention); each new token takes the position after the previous one."""
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = model(inputs_embeds=inputs_embeds, position_ids=positions[None], past_key_values=cache, use_cache=True).logits
    next_pos = int(positions[-1]) + 1
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if tok == eos_token_id:
            break
        emb = model.get_input_embeddings()(torch.tensor([[tok]]))
        logits = model(inputs_embeds=emb, position_ids=torch.tensor([[next_pos]]), past_key_values=cache, use_cache=True).logits
        next_pos += 1
    return out
