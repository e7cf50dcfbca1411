"""The committed ShapesVQA checkpoint (tests/fixtures/shapes-llava, see its README.md): it is the file
its sha256 names, it loads through the normal `tops-export --model DIR` path, and it really answers
ShapesVQA (val split; tops-eval reports the test split)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "shapes-llava"
SHA256 = "afc002a6acf6a8905d6ccee8a11d5b72e3b38043fb8e3ddafac46ce6e3d6c75d"


def test_checkpoint_matches_its_sha256():
    digest = hashlib.sha256((FIXTURE / "model.safetensors").read_bytes()).hexdigest()
    assert digest == SHA256
    sums = dict(reversed(line.split()) for line in (FIXTURE / "SHA256SUMS").read_text().splitlines())
    assert sums["model.safetensors"] == SHA256
    assert (FIXTURE / "model.safetensors").stat().st_size < 10 * 2**20


def test_checkpoint_records_the_commands_that_trained_it():
    info = json.loads((FIXTURE / "TRAINING.json").read_text())
    assert info["history"] and all(h["command"].startswith("python scripts/train_shapes_llava.py") for h in info["history"])
    assert info["history"][-1]["lm_steps"] == info["lm_steps"]


@pytest.fixture(scope="module")
def shapes_pipe(tmp_path_factory):
    from tops_edge.export import export_model
    from tops_edge.runtime import Pipeline

    out = export_model(str(FIXTURE), tmp_path_factory.mktemp("shapes") / "export", selector="tops", keep=64, progress=False)
    return Pipeline.load(out)


def test_checkpoint_exports_and_answers_val_questions(shapes_pipe):
    """Through the exported ONNX pipeline, unpruned: a model that had not learned the task would sit
    near chance (50% on yes/no, 20% on shapes); the checkpoint answers most of 36 val questions."""
    from tops_edge.eval.tasks import load_task, score

    items = load_task("shapesvqa", limit=36, split="val", types=["colour_exist", "shape_of_colour", "count"])
    hits = [score(it, shapes_pipe.generate(it.image, it.prompt, max_new_tokens=3, keep=576).text) for it in items]
    assert sum(hits) >= 30, f"{sum(hits)}/36"
