"""Qwen-VL preprocessing without HF's processor class (its video processor needs torchvision, which
cannot be imported beside the CPU torch): the PIL image processor, the tokenizer and the chat
template, combined as HF's `Qwen2_5_VLProcessor` combines them for image prompts. No torch import:
the runtime loads this from an export folder."""

from __future__ import annotations

from pathlib import Path

QWEN_IMAGE_TOKEN = "<|image_pad|>"


class QwenVLProcessor:
    """What HF's Qwen2.5-VL processor does for image prompts, over the PIL image processor and the
    tokenizer: the chat template, each `<|image_pad|>` expanded to the image's merged-patch count
    (grid t*h*w / merge^2), `mm_token_type_ids` (text 0, image 1: what HF's M-RoPE needs) and the
    image processor's `pixel_values` [patches, C*T*P*P] and `image_grid_thw`. HF's own class cannot
    be built without torchvision (its video processor); its files are the same, so a folder saved by
    either loads in both."""

    image_token = QWEN_IMAGE_TOKEN

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                                  **kwargs)

    def __call__(self, text, images=None, return_tensors: str = "pt"):
        import numpy as np

        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        visual = self.image_processor(images=list(images), return_tensors="np") if images else {}
        grids = [tuple(int(v) for v in g) for g in visual.get("image_grid_thw", [])]
        merge = self.image_processor.merge_size ** 2
        it = iter(grids)
        expanded = []
        for t in texts:
            parts = t.split(self.image_token)
            out = parts[0]
            for rest in parts[1:]:
                t_, h, w = next(it)
                out += "<|placeholder|>" * (t_ * h * w // merge) + rest
            expanded.append(out.replace("<|placeholder|>", self.image_token))
        enc = self.tokenizer(expanded, padding=True, return_tensors="np")
        ids = np.asarray(enc["input_ids"], np.int64)
        data = {"input_ids": ids, "attention_mask": np.asarray(enc["attention_mask"], np.int64),
                "mm_token_type_ids": (ids == self.image_token_id).astype(np.int64)}
        if images:
            data["pixel_values"] = np.asarray(visual["pixel_values"], np.float32)
            data["image_grid_thw"] = np.asarray(visual["image_grid_thw"], np.int64)
        if return_tensors == "pt":
            import torch

            return {k: torch.from_numpy(v) for k, v in data.items()}
        return data

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        self.image_processor.save_pretrained(str(directory))
        (directory / "chat_template.jinja").write_text(self.chat_template)


def qwen_processor(image_processor, tokenizer, chat_template: str | None = None) -> QwenVLProcessor:
    return QwenVLProcessor(image_processor, tokenizer, chat_template)


def load_qwen_processor(directory) -> QwenVLProcessor:
    """A saved Qwen-VL folder's processor, built from its tokenizer and `preprocessor_config.json`
    with the PIL image processor (AutoProcessor would also load the video processor: torchvision)."""
    import json

    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory))
    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        path = directory / name
        if path.is_file():
            text = path.read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    return qwen_processor(image_processor, tokenizer, template or tokenizer.chat_template)
