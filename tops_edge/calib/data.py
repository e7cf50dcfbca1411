"""Calibration sets: real image + prompt pairs, from a folder (`--calib DIR`) or built in (ShapesVQA).

A folder holds images and `prompts.jsonl`, one JSON object a line:

    {"image": "kitchen.jpg", "prompt": "What is on the table?"}
    {"prompt": "Describe the scene."}          # no "image": paired with the folder's images in name order

The set's digest (images' bytes + prompts) keys the calibration cache (calib/__init__.py: cache_key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

PROMPTS_NAME = "prompts.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_SIZE = 16  # built-in pairs: enough for min/max ranges of a tiny model, quick on a 7B
MAX_SAMPLES = 512


class CalibrationError(InputError):
    """The calibration folder or its prompts file cannot be used."""


@dataclass(frozen=True)
class CalibrationSet:
    name: str  # "shapesvqa-train-16" or the folder's path
    images: tuple  # PIL images, one per sample
    prompts: tuple[str, ...]
    digest: str  # sha256 over the samples' pixels and prompts

    def __len__(self) -> int:
        return len(self.prompts)


def _digest(images, prompts) -> str:
    h = hashlib.sha256()
    for image, prompt in zip(images, prompts):
        h.update(np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes())
        h.update(repr(image.size).encode())
        h.update(prompt.encode())
    return h.hexdigest()


def default_calibration_set(size: int = DEFAULT_SIZE) -> CalibrationSet:
    """ShapesVQA *train* scenes and questions (the eval uses the test split, so they never overlap)."""
    from ..eval.tasks import shapesvqa

    items = shapesvqa(size, split="train")
    images, prompts = tuple(i.image for i in items), tuple(i.prompt for i in items)
    return CalibrationSet(f"shapesvqa-train-{size}", images, prompts, _digest(images, prompts))


def load_calibration_set(directory, limit: int = MAX_SAMPLES) -> CalibrationSet:
    """The pairs in DIR/prompts.jsonl; any problem is one CalibrationError line naming the file."""
    from ..runtime.preprocess import load_image

    directory = Path(directory)
    if not directory.is_dir():
        raise CalibrationError(f"--calib {directory} is not a directory (it needs images and {PROMPTS_NAME})")
    prompts_path = directory / PROMPTS_NAME
    if not prompts_path.is_file():
        raise CalibrationError(f"--calib {directory} has no {PROMPTS_NAME} (one {{\"image\": ..., \"prompt\": ...}} a line)")
    folder_images = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    pairs = []
    unnamed = 0  # prompts without an image take the folder's images in turn
    try:
        lines = prompts_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{prompts_path} cannot be read ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{prompts_path}:{number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise CalibrationError(f"{prompts_path}:{number} needs a non-empty \"prompt\" string")
        if "image" in record:
            if not isinstance(record["image"], str):
                raise CalibrationError(f"{prompts_path}:{number}: \"image\" must be a file name")
            image = directory / record["image"]
        elif folder_images:
            image = folder_images[unnamed % len(folder_images)]
            unnamed += 1
        else:
            raise CalibrationError(f"{prompts_path}:{number} names no \"image\" and {directory} holds no images")
        pairs.append((image, record["prompt"]))
        if len(pairs) == limit:
            break
    if not pairs:
        raise CalibrationError(f"{prompts_path} holds no prompts")
    images = []
    for path, _ in pairs:
        try:
            images.append(load_image(path))
        except InputError as exc:  # names the image; say which --calib it came from
            raise CalibrationError(f"--calib {directory}: {exc}") from None
    prompts = tuple(p for _, p in pairs)
    return CalibrationSet(str(directory), tuple(images), prompts, _digest(images, prompts))


def calibration_set(source=None) -> CalibrationSet:
    """`None`: the built-in set; a folder path: its pairs; a CalibrationSet: itself."""
    if source is None:
        return default_calibration_set()
    if isinstance(source, CalibrationSet):
        return source
    return load_calibration_set(source)
