"""ShapesVQA-dense: crowded scenes, answers recomputed from the objects, adversarial POPE, balance,
determinism, disjoint splits, geometry and rendering; the task as tops-eval loads it. The scene tests
marked `GENERATORS` also run on ShapesVQA-wide (eval/shapes_wide.py: the same scenes on 672x336 and
336x672 canvases); its own tests are in test_shapes_wide.py."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from tops_edge.errors import InputError
from tops_edge.eval import shapes, shapes_dense as dense, shapes_wide as wide
from tops_edge.eval.tasks import Item, load_task

# the question texts, parsed here on their own (not from dense.TEMPLATES): the recomputation below
# must not trust the generator's wording
COLOUR, SHAPE = "|".join(shapes.COLOURS), "|".join(shapes.SHAPES)
PATTERNS = {
    "shape_of_colour": rf"What shape is the ({COLOUR}) object\?",
    "colour_of_shape": rf"What color is the ({SHAPE})\?",
    "pope": rf"Is there a ({COLOUR}) ({SHAPE})\?",
    "count_colour": rf"How many ({COLOUR}) shapes are there\?",
    "above_below": rf"Is the ({COLOUR}) ({SHAPE}) above the ({COLOUR}) ({SHAPE})\?",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]
#: the scene tests that hold for both generators of crowded scenes
GENERATORS = pytest.mark.parametrize("gen", [dense, wide], ids=["dense", "wide"])


def _parse(q):
    m = re.fullmatch(PATTERNS[q.qtype], q.question)
    assert m, q
    return m.groups()


def _with(objs, colour=None, shape=None):
    return [o for o in objs if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]


@GENERATORS
def test_every_answer_follows_from_the_objects(gen):
    seen = Counter()
    for index in range(300):
        s = gen.scene("train", index)
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
                assert abs(a.y - b.y) >= dense.MIN_SEPARATION  # never a near-tie
                assert (q.answer == "yes") == (a.y < b.y)  # image y grows downwards
            assert q.kind == dense.ANSWER_KIND[q.qtype]
    assert set(seen) == set(gen.QUESTION_TYPES) and min(seen.values()) >= 250


def test_scenes_plant_unique_referents_beside_distractors():
    for index in range(300):
        s = dense.scene("val", index)
        objs = s.objects
        assert dense.MIN_OBJECTS <= len(objs) <= dense.MAX_OBJECTS
        colours, shape_counts = Counter(o.colour for o in objs), Counter(o.shape for o in objs)
        # a unique colour whose object's shape another object has, and a unique shape whose colour another has
        assert any(colours[o.colour] == 1 and shape_counts[o.shape] > 1 for o in objs)
        assert any(shape_counts[o.shape] == 1 and colours[o.colour] > 1 for o in objs)
        types = [q.qtype for q in s.questions()]
        assert set(types) >= set(dense.QUESTION_TYPES) - {"above_below"}, index
        assert len(types) == len(set(types))


@GENERATORS
def test_pope_absent_pairs_are_adversarial(gen):
    seen = Counter()
    for index in range(300):
        s = gen.scene("test", index)
        for q in s.questions():
            if q.qtype == "pope" and q.answer == "no":
                colour, shape = _parse(q)
                assert _with(s.objects, colour=colour) and _with(s.objects, shape=shape)
                assert not _with(s.objects, colour, shape)
                seen[q.answer] += 1
    assert seen["no"] > 100


@GENERATORS
def test_answers_are_balanced_per_type(gen):
    by_type: dict[str, list[str]] = {}
    for _, q in gen.questions("test", 400 * len(gen.QUESTION_TYPES)):
        by_type.setdefault(q.qtype, []).append(q.answer)
    assert set(by_type) == set(gen.QUESTION_TYPES)
    expected = {"shape_of_colour": set(shapes.SHAPES), "colour_of_shape": set(shapes.COLOURS),
                "pope": {"yes", "no"}, "count_colour": set(NUMBER_WORDS), "above_below": {"yes", "no"}}
    for qtype, answers in by_type.items():
        assert len(answers) >= 350, qtype
        counts = Counter(answers)
        assert set(counts) == expected[qtype], qtype
        share = 1 / len(expected[qtype])  # every allowed answer near its fair share
        tolerance = 0.06 if share == 0.5 else 0.05
        for answer, n in counts.items():
            assert abs(n / len(answers) - share) < tolerance, (qtype, answer, n, len(answers))


@GENERATORS
def test_scenes_are_deterministic_and_prefixes_agree(gen):
    assert gen.scene("val", 3) == gen.scene("val", 3)
    assert np.array_equal(np.asarray(gen.scene("val", 3).image()), np.asarray(gen.scene("val", 3).image()))
    short, long = gen.questions("val", 12), gen.questions("val", 40)
    assert [(s.index, q) for s, q in short] == [(s.index, q) for s, q in long[:12]]
    # start: the pairs of scenes from `start` on, whatever came before
    later = gen.questions("val", 10, start=5)
    assert later[0][0].index == 5
    assert [(s.index, q) for s, q in later] == [(s.index, q) for s, q in long if s.index >= 5][:10]


def test_splits_share_no_scene_and_none_is_a_shapesvqa_scene():
    layout = lambda objs: tuple((o.colour, o.shape, o.x, o.y) for o in objs)  # noqa: E731
    splits = {split: {layout(dense.scene(split, i).objects) for i in range(200)} for split in ("train", "val", "test")}
    assert all(len(v) == 200 for v in splits.values())
    assert not splits["train"] & splits["val"] and not splits["train"] & splits["test"] and not splits["val"] & splits["test"]
    plain = {layout(shapes.scene(split, i).objects) for split in ("train", "val", "test") for i in range(200)}
    assert not plain & set().union(*splits.values())
    assert not {dense._SCENE_STREAM, dense._QUESTION_STREAM} & {0, 1}  # shapesvqa's streams: scenes and questions
    with pytest.raises(ValueError, match="unknown split"):
        dense.scene("dev", 0)


@GENERATORS
def test_objects_do_not_overlap_and_stay_inside(gen):
    for index in range(300):
        s = gen.scene("train", index)
        objs, (width, height) = s.objects, s.size
        for i, a in enumerate(objs):
            assert dense.MIN_HALF_WIDTH <= a.r <= dense.MAX_HALF_WIDTH
            assert dense.MARGIN <= a.x - a.r and a.x + a.r <= width - dense.MARGIN
            assert dense.MARGIN <= a.y - a.r and a.y + a.r <= height - dense.MARGIN
            for b in objs[i + 1:]:  # bounding boxes apart by at least MARGIN on one axis
                gap = a.r + b.r + dense.MARGIN
                assert abs(a.x - b.x) >= gap or abs(a.y - b.y) >= gap


@GENERATORS
def test_the_rendered_objects_are_where_the_scene_says(gen):
    background = np.array(shapes.BACKGROUND)
    for index in range(20):
        s = gen.scene("test", index)
        pixels = np.asarray(s.image())
        assert pixels.shape == (s.size[1], s.size[0], 3)
        inside = np.zeros(pixels.shape[:2], bool)
        for o in s.objects:
            assert tuple(pixels[o.y, o.x]) == shapes.COLOURS[o.colour]
            box = pixels[o.y - o.r:o.y + o.r + 1, o.x - o.r:o.x + o.r + 1].reshape(-1, 3)
            ink = box[np.any(box != background, -1)]
            assert (ink == shapes.COLOURS[o.colour]).all()  # only its own colour in its box: no overlap
            assert len(ink) >= 0.3 * (2 * o.r) ** 2  # big enough to see at patch resolution
            inside[o.y - o.r:o.y + o.r + 1, o.x - o.r:o.x + o.r + 1] = True
        assert (pixels[~inside] == background).all()  # nothing drawn outside the objects' boxes


# --- the task as tops-eval loads it --------------------------------------------------------------
def test_load_task_gives_prompts_and_accepted_answers():
    items = load_task("shapesvqa-dense", limit=20, split="val")
    assert len(items) == 20 and all(isinstance(i, Item) for i in items)
    for item in items:
        assert item.category in dense.QUESTION_TYPES and item.kind == dense.ANSWER_KIND[item.category]
        assert item.prompt.startswith(item.question + "\n") and item.prompt.endswith("single word or phrase.")
        assert item.answer and all(isinstance(a, str) and a for a in item.answer)
        assert item.image.size == (shapes.SIZE, shapes.SIZE)
    assert {i.category for i in items} == set(dense.QUESTION_TYPES)
    pairs = dense.questions("val", 20)
    assert [(i.question, i.answer) for i in items] == [(q.question, (q.answer,)) for _, q in pairs]


def test_load_task_split_types_limit_and_skip():
    whole = load_task("shapesvqa-dense", limit=10, split="val", types=["count_colour", "pope"])
    assert {i.category for i in whole} == {"count_colour", "pope"}
    tail = load_task("shapesvqa-dense", limit=4, split="val", types=["count_colour", "pope"], skip=6)
    assert [(i.question, i.answer) for i in tail] == [(i.question, i.answer) for i in whole[6:]]
    val, test = load_task("shapesvqa-dense", limit=12, split="val"), load_task("shapesvqa-dense", limit=12)
    assert [i.question for i in val] != [i.question for i in test]  # the default split is test
    with pytest.raises(InputError, match="--split must be val or test"):
        load_task("shapesvqa-dense", limit=5, split="train")


def test_unknown_dense_type_is_one_line_input_error():
    with pytest.raises(InputError) as err:
        load_task("shapesvqa-dense", limit=5, types=["count"])  # shapesvqa's type, not this task's
    message = str(err.value)
    assert "\n" not in message and "unknown ShapesVQA-dense question type" in message
    assert all(t in message for t in dense.QUESTION_TYPES)
    with pytest.raises(InputError, match="unknown ShapesVQA question type"):
        load_task("shapesvqa", limit=5, types=["count_colour"])  # and the other way round


def test_tops_eval_runs_the_dense_task_and_records_its_split(tiny_uniform_dir):
    from tops_edge.eval import run_eval

    report = run_eval(tiny_uniform_dir, task="shapesvqa-dense", keeps=[64], selectors=["uniform"], limit=5,
                      split="val", max_new_tokens=2)
    assert report["settings"]["split"] == "val" and report["settings"]["items"] == 5
    assert set(report["categories"]) <= set(dense.QUESTION_TYPES)
