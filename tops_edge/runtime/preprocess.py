"""HF-identical preprocessing from the files tops-export saved: image processor, tokenizer, chat template."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, ManifestError


class Preprocessor:
    def __init__(self, directory: Path, image_token_id: int, layout: str = "single"):
        from transformers import AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the torchvision -> PIL image-processor fallback notice
        try:
            if layout == "mrope":  # Qwen-VL: HF's processor class needs torchvision (runtime/qwen_processor.py)
                from .qwen_processor import load_qwen_processor

                self.processor = load_qwen_processor(directory)
            else:
                self.processor = AutoProcessor.from_pretrained(str(directory))
        except Exception as exc:
            raise ManifestError(f"cannot load the processor files in {directory}: {str(exc).splitlines()[0]}") from None
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.image_token_id = image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(image_token_id)

    def pixel_values(self, image) -> np.ndarray:
        return self.image_inputs(image)[0]

    def image_inputs(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """(pixel values [crops, C, H, W], the image's (height, width)). One crop for LLaVA-1.5; the
        base view plus the anyres crops for LLaVA-NeXT, whose processor says the image size. Qwen-VL:
        (patches [P, C*T*p*p], the resized image's patch grid (H, W) from image_grid_thw)."""
        img = load_image(image)
        try:
            out = self.image_processor(images=img, return_tensors="np")
        except ValueError as exc:  # e.g. Qwen's smart_resize: an aspect ratio above 200
            raise InputError(f"the image ({img.width}x{img.height}) cannot be preprocessed for this model: "
                             f"{str(exc).splitlines()[0]}") from None
        if "image_grid_thw" in out:
            t, h, w = (int(v) for v in out["image_grid_thw"][0])
            return np.ascontiguousarray(out["pixel_values"], dtype=np.float32), (h, w)
        pixels = np.asarray(out["pixel_values"], np.float32)
        if pixels.ndim == 5:  # [images, crops, C, H, W]
            pixels = pixels[0]
        size = tuple(int(v) for v in out["image_sizes"][0]) if "image_sizes" in out else (img.height, img.width)
        return np.ascontiguousarray(pixels), size

    def prompt_text(self, prompt: str, raw: bool = False) -> str:
        """The user's question in the model's chat template with one image slot; `raw` = already templated."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty")
        if raw:
            return prompt
        if self.image_token in prompt:
            raise InputError(f"the prompt contains '{self.image_token}'; pass the question only, or use a raw prompt")
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def split_ids(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids before and after the single image slot (BOS included, as HF tokenizes it)."""
        ids = np.asarray(self.tokenizer(text)["input_ids"], dtype=np.int64)
        slots = np.flatnonzero(ids == self.image_token_id)
        if len(slots) != 1:
            raise InputError(f"the prompt must have exactly one image slot '{self.image_token}', found {len(slots)}")
        return ids[: slots[0]], ids[slots[0] + 1 :]

    def instruction_ids(self, prompt: str, raw: bool = False) -> np.ndarray:
        """The user's own words as token ids, for instruction-aware selectors: no chat template, no
        image slot, no special tokens. A raw prompt is used whole, less its image slot."""
        text = prompt.replace(self.image_token, " ") if raw else prompt
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        return ids[ids != self.image_token_id]

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def load_image(image):
    """A PIL RGB image from a path, a PIL image or an HxWx3 uint8 array; bad input -> InputError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise InputError(f"an image array must be HxWx3 uint8, got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image {path} does not exist")
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"image {path} cannot be decoded ({exc})") from None
    raise InputError(f"unsupported image type {type(image).__name__}; pass a path, a PIL image or a uint8 array")
