"""Shared fixtures: tiny models built in code, exported once per session. No downloads, ever."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest

from tops_edge.export import export_model
from tops_edge.models import load


def make_image(width: int, height: int, seed: int):
    """A smooth random scene (gradients + blobs): structured enough that visual tokens differ."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = 127 + 60 * np.sin(x / rng.uniform(15, 60) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(15, 60))
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 80)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


IMAGES = {"wide": (480, 300, 1), "tall": (260, 420, 2), "square": (336, 336, 3)}
PROMPTS = ["What is in the picture?", "Describe the image in detail.", "How many red circles are there?"]


@pytest.fixture(scope="session")
def images():
    return {name: make_image(*spec) for name, spec in IMAGES.items()}


@pytest.fixture(scope="session")
def tiny():
    return load("tiny-llava")


@pytest.fixture(scope="session")
def tiny_none_dir(tmp_path_factory, tiny):
    return export_model(tiny, tmp_path_factory.mktemp("export") / "tiny-none", selector="none", progress=False)


@pytest.fixture(scope="session")
def tiny_uniform_dir(tmp_path_factory, tiny):
    return export_model(tiny, tmp_path_factory.mktemp("export") / "tiny-uniform", selector="uniform", keep=64, progress=False)


@pytest.fixture(scope="session")
def pipe_uniform(tiny_uniform_dir):
    from tops_edge.runtime import Pipeline

    return Pipeline.load(tiny_uniform_dir)


@pytest.fixture
def one_torch_thread():
    """Greedy selectors run many tiny ops per step: torch's thread pool only adds contention there
    (measured 40x slower on a busy 2-core host)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def deep():
    """tiny-llava with a 6-layer Llama: room for decoder cuts at 2 and 4 (tests of in-LLM pruning)."""
    from tops_edge.models.llava import LlavaAdapter
    from tops_edge.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=5, text=dict(num_hidden_layers=6))
    return LlavaAdapter(model, processor, source="tiny-llava-6")


@pytest.fixture(scope="module")
def image():
    """examples/shapes.png as an RGB PIL image."""
    from PIL import Image

    from cli_helpers import EXAMPLE

    return Image.open(EXAMPLE).convert("RGB")
