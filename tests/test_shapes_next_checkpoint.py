"""The shipped LLaVA-NeXT ShapesVQA checkpoint (`--model shapes-llava-next`,
tops_edge/assets/shapes-llava-next, see its README.md): `shapes-llava-deep` converted to anyres and
trained on wide and tall scenes. It loads through the built-in name as LLaVA-NeXT, and through the
exported pipeline it really answers `shapesvqa-wide` val questions of the types it learned, unpruned
and at 256 of its 1728 selectable tokens with either budget split. (Its sha256, package data and
training commands are checked with the other checkpoints' in test_shapes_checkpoint.py.)"""

from __future__ import annotations

import pytest

from tops_edge.eval.tasks import load_task, score
from tops_edge.export import export_model
from tops_edge.runtime import Pipeline

NAME = "shapes-llava-next"
#: the types it learned (val, its README): count_colour and above_below stay near chance
TYPES = ["shape_of_colour", "colour_of_shape", "pope"]


@pytest.fixture(scope="module")
def next_pipe(tmp_path_factory):
    out = export_model(NAME, tmp_path_factory.mktemp("next") / "export", selector="dpp-merge", keep=256, progress=False)
    return Pipeline.load(out)


@pytest.fixture(scope="module")
def items():
    return load_task("shapesvqa-wide", limit=30, split="val", types=TYPES)


def test_it_is_a_llava_next_with_wide_and_tall_pinpoints(next_pipe):
    visual = next_pipe.manifest["visual"]
    assert next_pipe.manifest["model"]["source"] == NAME
    assert visual["layout"] == "anyres" and visual["grid_pinpoints"] == [[336, 336], [336, 672], [672, 336]]


def test_it_answers_wide_and_tall_val_questions_unpruned(next_pipe, items):
    """A model that had not learned them would sit near chance (50% on yes/no, 20-25% on shapes and
    colours): unpruned (all 1728 tokens of a 672x336 or 336x672 scene) it answers nearly all."""
    assert {it.image.size for it in items} == {(672, 336), (336, 672)}
    hits = sum(score(it, next_pipe.generate(it.image, it.prompt, max_new_tokens=3, keep_ratio=1.0).text) for it in items)
    assert hits >= 25, f"unpruned {hits}/30"


@pytest.mark.parametrize("budget", ["proportional", "global"])
def test_it_still_answers_most_at_256_tokens(next_pipe, items, budget):
    hits = sum(score(it, next_pipe.generate(it.image, it.prompt, max_new_tokens=3, keep=256, budget=budget).text)
               for it in items)
    assert hits >= 18, f"dpp-merge at 256 tokens, {budget}: {hits}/30"
