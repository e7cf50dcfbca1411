"""The shipped deeper ShapesVQA checkpoint (`--model shapes-llava-deep`, tops_edge/assets/shapes-llava-deep,
see its README.md): an 8-layer Llama, so the paper's cuts (3/8 L and 3/4 L: layers 3 and 6) and TopV's
are real decoder cuts. It loads through the built-in name, exports with `tops` in three stages, and
really answers both tasks' val questions, unpruned and with the paper's method at 64 tokens. (Its
sha256, package data and training commands are checked with the other checkpoint's in
test_shapes_checkpoint.py; tops-eval reports the test split.)"""

from __future__ import annotations

import json

import pytest

from tops_edge.eval.tasks import load_task, score
from tops_edge.export import export_model
from tops_edge.models import checkpoint_dir
from tops_edge.runtime import Pipeline

NAME = "shapes-llava-deep"
# the types this model learned (docs/fidelity.md: count_colour and above_below stay near chance)
DENSE_TYPES = ["shape_of_colour", "colour_of_shape", "pope"]
SHAPES_TYPES = ["colour_exist", "shape_of_colour", "pope"]


@pytest.fixture(scope="module")
def deep_pipe(tmp_path_factory):
    out = export_model(NAME, tmp_path_factory.mktemp("deep") / "export", selector="tops", keep=64, progress=False)
    return Pipeline.load(out)


def test_the_deep_checkpoint_has_eight_llama_layers_and_the_same_tower():
    deep = json.loads((checkpoint_dir(NAME) / "config.json").read_text())
    base = json.loads((checkpoint_dir("shapes-llava") / "config.json").read_text())
    assert deep["text_config"]["num_hidden_layers"] == 8 and base["text_config"]["num_hidden_layers"] == 2
    assert deep["vision_config"]["image_size"] == base["vision_config"]["image_size"] == 336


def test_tops_prunes_it_before_the_llm_and_at_layers_3_and_6(deep_pipe, image):
    assert deep_pipe.manifest["model"]["source"] == NAME
    r = deep_pipe.generate(image, "What shape is the red object?", max_new_tokens=2, keep=64)
    assert [(s["layer"], s["keep"]) for s in r.stages] == [(0, 128), (3, 32), (6, 16)]


@pytest.mark.parametrize("task, types", [("shapesvqa-dense", DENSE_TYPES), ("shapesvqa", SHAPES_TYPES)])
def test_it_answers_val_questions_unpruned_and_at_64_tokens(deep_pipe, task, types):
    """30 val questions of learned types, through the exported pipeline: a model that had not learned
    them would sit near chance (50% on yes/no, 20-25% on shapes and colours). Unpruned it answers
    nearly all; the paper's method at 64 of 576 tokens (no merging) still most."""
    items = load_task(task, limit=30, split="val", types=types)
    full = sum(score(it, deep_pipe.generate(it.image, it.prompt, max_new_tokens=2, keep=576).text) for it in items)
    pruned = sum(score(it, deep_pipe.generate(it.image, it.prompt, max_new_tokens=2, keep=64).text) for it in items)
    assert full >= 27, f"unpruned {full}/30"
    assert pruned >= 15, f"tops at 64 tokens {pruned}/30"
