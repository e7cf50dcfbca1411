"""Shared by the Qwen-VL tests: images, the chat prompt and HF references (HF's own code paths)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PROMPT = "What is in the picture?"
NEW_TOKENS = 10


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def chat(processor, prompt: str = PROMPT) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@torch.no_grad()
def hf_qwen_generate(model, processor, image, prompt: str = PROMPT, new: int = NEW_TOKENS) -> list[int]:
    inputs = processor(text=[chat(processor, prompt)], images=[image], return_tensors="pt")
    assert "mm_token_type_ids" in inputs  # without it HF silently uses 1-D positions
    out = model.generate(**inputs, max_new_tokens=new, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def hf_pruned_prompt(model, processor, image, kept, prompt: str = PROMPT):
    """(inputs_embeds [1, L', D], position ids [3, L']) of the prompt with only the image tokens at
    `kept`: HF's image features and HF's get_rope_index positions of the unpruned prompt, the
    dropped image columns removed."""
    inputs = processor(text=[chat(processor, prompt)], images=[image], return_tensors="pt")
    ids = inputs["input_ids"]
    positions, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    image_rows = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    start = int(image_rows[0])
    text = model.get_input_embeddings()(ids)
    keep_rows = torch.cat([torch.arange(start), start + torch.as_tensor(kept), torch.arange(int(image_rows[-1]) + 1, ids.shape[1])])
    embeds = torch.cat([text[:, :start], feats[torch.as_tensor(kept)][None], text[:, int(image_rows[-1]) + 1:]], dim=1)
    return embeds, positions[:, 0, keep_rows]


@torch.no_grad()
def hf_pruned_deepstack(model, processor, image, kept, prompt: str = PROMPT) -> torch.Tensor:
    """Qwen3-VL: [L_ds, L', D] HF's DeepStack features on the kept image rows of the pruned prompt
    (hf_pruned_prompt's rows), zeros on the text rows: what HF adds after decoder layer i there."""
    inputs = processor(text=[chat(processor, prompt)], images=[image], return_tensors="pt")
    ids = inputs["input_ids"]
    out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    rows = torch.stack([feats[0] for feats in out.deepstack_features])  # [L_ds, N, D] (one image)
    image_rows = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    start, end = int(image_rows[0]), int(image_rows[-1]) + 1
    kept = torch.as_tensor(kept)
    length = start + len(kept) + ids.shape[1] - end
    full = torch.zeros(rows.shape[0], length, rows.shape[2])
    full[:, start:start + len(kept)] = rows[:, kept]
    return full
