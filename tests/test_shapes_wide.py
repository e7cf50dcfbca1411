"""ShapesVQA-wide: wide and tall crowded scenes, answers recomputed from the objects, adversarial POPE,
balance, determinism, disjoint splits, geometry and rendering; the task as tops-eval loads it; and
shapesvqa-dense unchanged by the parameterisation the two tasks share."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pytest

from tops_edge.errors import InputError
from tops_edge.eval import shapes, shapes_dense, shapes_wide as wide
from tops_edge.eval.tasks import BUILTIN_TASKS, Item, load_task

# the question texts, parsed here on their own (not from the generator's TEMPLATES)
COLOUR, SHAPE = "|".join(shapes.COLOURS), "|".join(shapes.SHAPES)
PATTERNS = {
    "shape_of_colour": rf"What shape is the ({COLOUR}) object\?",
    "colour_of_shape": rf"What color is the ({SHAPE})\?",
    "pope": rf"Is there a ({COLOUR}) ({SHAPE})\?",
    "count_colour": rf"How many ({COLOUR}) shapes are there\?",
    "above_below": rf"Is the ({COLOUR}) ({SHAPE}) above the ({COLOUR}) ({SHAPE})\?",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]


def _parse(q):
    m = re.fullmatch(PATTERNS[q.qtype], q.question)
    assert m, q
    return m.groups()


def _with(objs, colour=None, shape=None):
    return [o for o in objs if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]


def test_every_answer_follows_from_the_objects():
    seen = Counter()
    for index in range(300):
        s = wide.scene("train", index)
        objs = s.objects
        for q in s.questions():
            g = _parse(q)
            seen[q.qtype] += 1
            if q.qtype == "shape_of_colour":
                (match,) = _with(objs, colour=g[0])  # exactly one object of that colour
                assert q.answer == match.shape
            elif q.qtype == "colour_of_shape":
                (match,) = _with(objs, shape=g[0])
                assert q.answer == match.colour
            elif q.qtype == "pope":
                assert (q.answer == "yes") == bool(_with(objs, *g))
            elif q.qtype == "count_colour":
                assert q.answer == NUMBER_WORDS[len(_with(objs, colour=g[0]))]
            elif q.qtype == "above_below":
                (a,) = _with(objs, g[0], g[1])  # both named objects are the only ones of their name
                (b,) = _with(objs, g[2], g[3])
                assert abs(a.y - b.y) >= shapes_dense.MIN_SEPARATION
                assert (q.answer == "yes") == (a.y < b.y)  # image y grows downwards
            assert q.kind == shapes_dense.ANSWER_KIND[q.qtype]
    assert set(seen) == set(wide.QUESTION_TYPES) and min(seen.values()) >= 250


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


def test_objects_do_not_overlap_and_stay_inside_their_canvas():
    margin = shapes_dense.MARGIN
    far = {"x": 0, "y": 0}  # objects beyond the first 336 px of the long axis: the scene uses all of it
    for index in range(200):
        s = wide.scene("train", index)
        width, height = s.size
        for i, a in enumerate(s.objects):
            assert shapes_dense.MIN_HALF_WIDTH <= a.r <= shapes_dense.MAX_HALF_WIDTH
            assert margin <= a.x - a.r and a.x + a.r <= width - margin
            assert margin <= a.y - a.r and a.y + a.r <= height - margin
            far["x"] += a.x > 336
            far["y"] += a.y > 336
            for b in s.objects[i + 1:]:
                gap = a.r + b.r + margin
                assert abs(a.x - b.x) >= gap or abs(a.y - b.y) >= gap
    assert far["x"] > 500 and far["y"] > 500


def test_the_rendered_objects_are_where_the_scene_says():
    background = np.array(shapes.BACKGROUND)
    for index in range(12):
        s = wide.scene("test", index)
        pixels = np.asarray(s.image())
        assert pixels.shape == (s.size[1], s.size[0], 3)
        inside = np.zeros(pixels.shape[:2], bool)
        for o in s.objects:
            assert tuple(pixels[o.y, o.x]) == shapes.COLOURS[o.colour]
            box = pixels[o.y - o.r:o.y + o.r + 1, o.x - o.r:o.x + o.r + 1].reshape(-1, 3)
            ink = box[np.any(box != background, -1)]
            assert (ink == shapes.COLOURS[o.colour]).all()
            assert len(ink) >= 0.3 * (2 * o.r) ** 2
            inside[o.y - o.r:o.y + o.r + 1, o.x - o.r:o.x + o.r + 1] = True
        assert (pixels[~inside] == background).all()


def test_pope_absent_pairs_are_adversarial():
    seen = Counter()
    for index in range(300):
        s = wide.scene("test", index)
        for q in s.questions():
            if q.qtype == "pope" and q.answer == "no":
                colour, shape = _parse(q)
                assert _with(s.objects, colour=colour) and _with(s.objects, shape=shape)
                assert not _with(s.objects, colour, shape)
                seen[q.answer] += 1
    assert seen["no"] > 100


def test_answers_are_balanced_per_type():
    by_type: dict[str, list[str]] = {}
    for _, q in wide.questions("test", 400 * len(wide.QUESTION_TYPES)):
        by_type.setdefault(q.qtype, []).append(q.answer)
    assert set(by_type) == set(wide.QUESTION_TYPES)
    expected = {"shape_of_colour": set(shapes.SHAPES), "colour_of_shape": set(shapes.COLOURS),
                "pope": {"yes", "no"}, "count_colour": set(NUMBER_WORDS), "above_below": {"yes", "no"}}
    for qtype, answers in by_type.items():
        assert len(answers) >= 350, qtype
        counts = Counter(answers)
        assert set(counts) == expected[qtype], qtype
        share = 1 / len(expected[qtype])
        tolerance = 0.06 if share == 0.5 else 0.05
        for answer, n in counts.items():
            assert abs(n / len(answers) - share) < tolerance, (qtype, answer, n, len(answers))


def test_scenes_are_deterministic_and_prefixes_agree():
    assert wide.scene("val", 3) == wide.scene("val", 3)
    assert np.array_equal(np.asarray(wide.scene("val", 3).image()), np.asarray(wide.scene("val", 3).image()))
    short, long = wide.questions("val", 12), wide.questions("val", 40)
    assert [(s.index, q) for s, q in short] == [(s.index, q) for s, q in long[:12]]
    later = wide.questions("val", 10, start=5)
    assert later[0][0].index == 5
    assert [(s.index, q) for s, q in later] == [(s.index, q) for s, q in long if s.index >= 5][:10]


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
