"""ShapesVQA-wide: wide and tall crowded scenes with twice as many objects as the dense task's, disjoint
splits, the whole canvas used; the task as tops-eval loads it; and shapesvqa-dense unchanged by the
parameterisation the two tasks share. Answers recomputed from the objects, adversarial POPE, balance,
determinism, geometry and rendering are tested for both tasks in test_shapes_dense.py."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from tops_edge.errors import InputError
from tops_edge.eval import shapes, shapes_dense, shapes_wide as wide
from tops_edge.eval.tasks import BUILTIN_TASKS, Item, load_task


def test_scenes_alternate_wide_and_tall_and_are_twice_as_crowded():
    counts = []
    for index in range(300):
        s = wide.scene("val", index)
        assert s.size == ((672, 336) if index % 2 == 0 else (336, 672)) == wide.canvas(index)
        assert s.image().size == s.size
        objs = s.objects
        counts.append(len(objs))
        assert wide.MIN_OBJECTS <= len(objs) <= wide.MAX_OBJECTS
        colours, shape_counts = Counter(o.colour for o in objs), Counter(o.shape for o in objs)
        assert any(colours[o.colour] == 1 and shape_counts[o.shape] > 1 for o in objs)  # planted referents
        assert any(shape_counts[o.shape] == 1 and colours[o.colour] > 1 for o in objs)
        types = [q.qtype for q in s.questions()]
        assert set(types) >= set(wide.QUESTION_TYPES) - {"above_below"}, index
        assert len(types) == len(set(types))
    dense_counts = [len(shapes_dense.scene("val", i).objects) for i in range(300)]
    assert 1.7 < np.mean(counts) / np.mean(dense_counts) < 2.3
    assert min(counts) == wide.MIN_OBJECTS and max(counts) == wide.MAX_OBJECTS


def test_objects_use_the_whole_long_axis():
    """Objects beyond the first 336 px of the long axis, on both canvases (overlap and bounds are
    checked with the dense task's in test_shapes_dense.py)."""
    far = {"x": 0, "y": 0}
    for index in range(200):
        for a in wide.scene("train", index).objects:
            far["x"] += a.x > 336
            far["y"] += a.y > 336
    assert far["x"] > 500 and far["y"] > 500


def test_splits_share_no_scene_and_none_is_another_tasks():
    layout = lambda objs: tuple((o.colour, o.shape, o.x, o.y) for o in objs)  # noqa: E731
    splits = {split: {layout(wide.scene(split, i).objects) for i in range(200)} for split in ("train", "val", "test")}
    assert all(len(v) == 200 for v in splits.values())
    assert not splits["train"] & splits["val"] and not splits["train"] & splits["test"] and not splits["val"] & splits["test"]
    others = {layout(g.scene(split, i).objects) for g in (shapes, shapes_dense)
              for split in ("train", "val", "test") for i in range(200)}
    assert not others & set().union(*splits.values())
    streams = {wide._SCENE_STREAM, wide._QUESTION_STREAM}
    assert len(streams) == 2 and not streams & {0, 1, shapes_dense._SCENE_STREAM, shapes_dense._QUESTION_STREAM}
    assert wide.scene("val", 0).question_stream == wide._QUESTION_STREAM
    assert shapes_dense.scene("val", 0).question_stream == shapes_dense._QUESTION_STREAM
    with pytest.raises(ValueError, match="unknown split"):
        wide.scene("dev", 0)


def test_dense_scenes_are_unchanged_by_the_shared_generator():
    """shapesvqa-dense's scenes, questions and pixels as they were before build_scene / render took a
    canvas size (a fingerprint recorded from the code before that change)."""
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        for i in range(150):
            s = shapes_dense.scene(split, i)
            h.update(repr((s.objects, s.count_colour, s.questions())).encode())
    images = b"".join(np.asarray(shapes_dense.scene(split, i).image()).tobytes() for split in ("train", "test")
                      for i in range(5))
    assert h.hexdigest() == "40318817a1a4478340b423023f37e444f30e5352ec55b8910b3112d9e29b9cc5"
    assert hashlib.sha256(images).hexdigest() == "7ed88c75c099aaf388d3e4aaeba52e3a2c0d9d6e17ef1be730b6744e70eedb4f"


# --- the task as tops-eval loads it --------------------------------------------------------------
def test_load_task_gives_wide_and_tall_images_with_prompts():
    assert "shapesvqa-wide" in BUILTIN_TASKS
    items = load_task("shapesvqa-wide", limit=20, split="val")
    assert len(items) == 20 and all(isinstance(i, Item) for i in items)
    pairs = wide.questions("val", 20)
    assert [(i.question, i.answer) for i in items] == [(q.question, (q.answer,)) for _, q in pairs]
    for item, (scene, _) in zip(items, pairs):
        assert item.category in wide.QUESTION_TYPES and item.kind == wide.ANSWER_KIND[item.category]
        assert item.prompt.startswith(item.question + "\n") and item.prompt.endswith("single word or phrase.")
        assert item.image.size == scene.size
    assert {i.image.size for i in items} == {(672, 336), (336, 672)}
    assert {i.category for i in items} == set(wide.QUESTION_TYPES)


def test_load_task_split_types_limit_skip_and_errors():
    whole = load_task("shapesvqa-wide", limit=10, split="val", types=["count_colour", "above_below"])
    assert {i.category for i in whole} == {"count_colour", "above_below"}
    tail = load_task("shapesvqa-wide", limit=4, split="val", types=["count_colour", "above_below"], skip=6)
    assert [(i.question, i.answer) for i in tail] == [(i.question, i.answer) for i in whole[6:]]
    val, test = load_task("shapesvqa-wide", limit=12, split="val"), load_task("shapesvqa-wide", limit=12)
    assert [i.question for i in val] != [i.question for i in test]  # the default split is test
    dense = load_task("shapesvqa-dense", limit=12, split="val")
    assert [i.question for i in val] != [i.question for i in dense]
    with pytest.raises(InputError, match="--split must be val or test"):
        load_task("shapesvqa-wide", limit=5, split="train")
    with pytest.raises(InputError) as err:
        load_task("shapesvqa-wide", limit=5, types=["left_right"])  # shapesvqa's type, not this task's
    assert "\n" not in str(err.value) and "unknown ShapesVQA-wide question type" in str(err.value)
    with pytest.raises(InputError, match="shapesvqa-wide"):
        load_task("shapes-wide")  # the unknown-task message lists it


def test_tops_eval_help_names_the_wide_task():
    from tops_edge.cli import eval_parser

    text = " ".join(eval_parser().format_help().split())
    assert "shapesvqa-wide (crowded 672x336 and 336x672" in text
    assert "shapesvqa-dense and shapesvqa-wide: shape_of_colour" in text
