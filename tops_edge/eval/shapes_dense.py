"""ShapesVQA-dense: crowded ShapesVQA scenes whose answers live in one small region the question names,
so a visual-token budget that drops that region loses the answer.

A scene is a 336x336 image (ShapesVQA's background, colours, shapes and drawing) with 8-16 small
objects (half-widths 12-22 px, i.e. about 2-3 patches of 14 px across), their bounding boxes apart by
at least MARGIN px. Every scene is built around planted referents and their distractors:

  - one object of a colour no other object has (its shape is shared by at least one other object),
  - one object of a shape no other object has (its colour is shared by at least one other object),
  - a colour that appears exactly k times, k drawn uniformly from zero .. five,

and the rest are random objects that keep those three properties. (colour, shape) pairs may repeat.

  shape_of_colour "What shape is the red object?"                 a shape (the colour is unique)
  colour_of_shape "What color is the circle?"                     a colour (the shape is unique)
  pope            "Is there a red circle?"                        yes / no (balanced); the absent pair's
                                                                  colour and shape are both in the scene,
                                                                  never together
  count_colour    "How many red shapes are there?"                zero .. five (balanced)
  above_below     "Is the red circle above the blue square?"      yes / no (balanced); both objects are
                                                                  the only ones of their (colour, shape),
                                                                  centres at least MIN_SEPARATION px
                                                                  apart vertically

Splits follow ShapesVQA's seed scheme (split, index, stream) with streams of their own, so scene i of
split s is drawn from its own generator, a split's items do not depend on how many were asked for,
train, val and test never share a scene, and no scene is one of ShapesVQA's.

The generator is parameterised on the canvas and the object count (`build_scene`, `render`), so
shapesvqa-wide (eval/shapes_wide.py) lays out the same kind of scene on 672x336 and 336x672 canvases
with streams of its own; this task's scenes are what they were before that parameterisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .shapes import BACKGROUND, COLOURS, NUMBERS, SHAPES, SIZE, Question, _rng, ask, draw_shape

MIN_OBJECTS, MAX_OBJECTS = 8, 16
MIN_HALF_WIDTH, MAX_HALF_WIDTH = 12, 22  # pixels; ShapesVQA's small objects are 22
MARGIN = 6  # minimum gap between two objects' bounding boxes, and from the image border, in pixels
MAX_COUNT = 5  # count_colour answers: zero .. five
MIN_SEPARATION = 28  # above_below: vertical distance between the two centres (two patches), pixels
QUESTION_TYPES = ("shape_of_colour", "colour_of_shape", "pope", "count_colour", "above_below")
ANSWER_KIND = {
    "shape_of_colour": "short", "colour_of_shape": "short", "pope": "yesno", "count_colour": "short",
    "above_below": "yesno",
}
#: the question texts ({colour}, {shape}; above_below names two objects as {a} and {b}, "colour shape")
TEMPLATES = {
    "shape_of_colour": "What shape is the {colour} object?",
    "colour_of_shape": "What color is the {shape}?",
    "pope": "Is there a {colour} {shape}?",
    "count_colour": "How many {colour} shapes are there?",
    "above_below": "Is the {a} above the {b}?",
}
_SCENE_STREAM, _QUESTION_STREAM = 0xD0, 0xD1  # ShapesVQA uses streams 0 and 1
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    r: int  # half-width, pixels
    x: int  # centre, pixels
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    objects: tuple[Obj, ...]
    count_colour: str  # the colour the count_colour question asks about (planted k times, k in 0..5)
    #: the generator stream of the scene's questions (shapesvqa-wide's scenes have their own)
    question_stream: ClassVar[int] = _QUESTION_STREAM

    @property
    def size(self) -> tuple[int, int]:
        """The canvas, (width, height) in pixels."""
        return SIZE, SIZE

    def image(self):
        return render(self.objects, self.size)

    def questions(self) -> list[Question]:
        """One question of each type the scene allows, drawn from the scene's own generator."""
        rng = _rng(self.split, self.index, stream=self.question_stream)
        out = []
        for qtype in QUESTION_TYPES:
            q = QUESTION_MAKERS[qtype](self, rng)
            if q is not None:
                out.append(DenseQuestion(qtype, *q))
        return out


class DenseQuestion(Question):
    """A ShapesVQA-dense question: ShapesVQA's Question with this task's answer kinds."""

    @property
    def kind(self) -> str:
        return ANSWER_KIND[self.qtype]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _plan(rng, counts: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)) -> tuple[list[tuple[str, str]], str]:
    """The scene's (colour, shape) pairs (between counts[0] and counts[1] of them, at least the planted
    referents'), in random order, and the colour planted `k` times."""
    colours = list(COLOURS)
    n = int(rng.integers(counts[0], counts[1] + 1))
    unique_colour, unique_shape = _pick(rng, colours), _pick(rng, SHAPES)
    shape_a = _pick(rng, [s for s in SHAPES if s != unique_shape])  # the unique-colour object's shape
    colour_b = _pick(rng, [c for c in colours if c != unique_colour])  # the unique-shape object's colour
    counted = _pick(rng, [c for c in colours if c not in (unique_colour, colour_b)])
    k = int(rng.integers(0, MAX_COUNT + 1))
    other_shapes = [s for s in SHAPES if s != unique_shape]
    free_colours = [c for c in colours if c not in (unique_colour, counted)]  # includes colour_b
    pairs = [(unique_colour, shape_a), (colour_b, unique_shape)]
    # the counted colour's k objects; the first (or, for k = 0, another colour's) shares the unique-colour
    # object's shape, so "the <unique colour> object" has a same-shape distractor
    pairs += [(counted, shape_a if i == 0 else _pick(rng, other_shapes)) for i in range(k)]
    if k == 0:
        pairs.append((_pick(rng, free_colours), shape_a))
    pairs.append((colour_b, _pick(rng, other_shapes)))  # a same-colour distractor of the unique shape
    while len(pairs) < n:
        pairs.append((_pick(rng, free_colours), _pick(rng, other_shapes)))
    order = rng.permutation(len(pairs))
    return [pairs[int(i)] for i in order], counted


def _apart(x, y, r, o: Obj) -> bool:
    gap = r + o.r + MARGIN
    return abs(x - o.x) >= gap or abs(y - o.y) >= gap


def _place(rng, pairs, width: int = SIZE, height: int = SIZE) -> tuple[Obj, ...] | None:
    """The objects of `pairs` at random places on a width x height canvas, or None when one did not fit."""
    objects: list[Obj] = []
    for colour, shape in pairs:
        r = int(rng.integers(MIN_HALF_WIDTH, MAX_HALF_WIDTH + 1))
        for _ in range(_PLACEMENT_TRIES):
            # one draw of (x, y) with per-axis bounds (for a square canvas the same numbers as size=2)
            x, y = (int(v) for v in rng.integers(r + MARGIN, (width - r - MARGIN, height - r - MARGIN)))
            if all(_apart(x, y, r, o) for o in objects):
                objects.append(Obj(shape, colour, r, x, y))
                break
        else:
            return None
    return tuple(objects)


def build_scene(split: str, index: int, stream: int, counts: tuple[int, int], size: tuple[int, int]):
    """(objects, counted colour) of scene `index` of `split`, drawn from generator stream `stream`:
    counts[0]..counts[1] small, non-overlapping objects around planted referents on a canvas of
    `size` (width, height)."""
    rng = _rng(split, index, stream=stream)
    pairs, counted = _plan(rng, counts)
    while (objects := _place(rng, pairs, *size)) is None:  # a crowded layout that did not fit: lay it out again
        pass
    return objects, counted


def scene(split: str, index: int) -> Scene:
    """Scene `index` of `split`: 8-16 small, non-overlapping objects around planted referents."""
    return Scene(split, index, *build_scene(split, index, _SCENE_STREAM, (MIN_OBJECTS, MAX_OBJECTS), (SIZE, SIZE)))


def render(objects, size: tuple[int, int] = (SIZE, SIZE)) -> "Image.Image":  # noqa: F821
    """ShapesVQA's drawing (shapes.render) at each object's own half-width, on a canvas of `size`
    (width, height)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", tuple(size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw_shape(draw, o.shape, o.x, o.y, o.r, COLOURS[o.colour])
    return img


# --- question makers: (scene, rng) -> (question, answer) or None when the scene does not allow it
def _unique(objects, key):
    counts: dict = {}
    for o in objects:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return [o for o in objects if counts[key(o)] == 1]


def _attribute_of_unique(qtype: str, named: str, asked: str):
    """A maker for "what <asked> is the object whose <named> is unique?" (the planted referents)."""
    def make(scene, rng):
        unique = _unique(scene.objects, lambda o: getattr(o, named))
        if not unique:
            return None
        o = _pick(rng, unique)
        return TEMPLATES[qtype].format(**{named: getattr(o, named)}), getattr(o, asked)
    return make


_shape_of_colour = _attribute_of_unique("shape_of_colour", "colour", "shape")
_colour_of_shape = _attribute_of_unique("colour_of_shape", "shape", "colour")


def _pope(scene, rng):
    objects = scene.objects
    pairs = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        c, s = _pick(rng, sorted(pairs))
        return TEMPLATES["pope"].format(colour=c, shape=s), "yes"
    colours, shapes = {o.colour for o in objects}, {o.shape for o in objects}
    adversarial = sorted((c, s) for c in colours for s in shapes if (c, s) not in pairs)
    if not adversarial:  # the planted referents always leave one; a scene without is no pope scene
        return None
    c, s = _pick(rng, adversarial)
    return TEMPLATES["pope"].format(colour=c, shape=s), "no"


def _count_colour(scene, rng):
    k = sum(o.colour == scene.count_colour for o in scene.objects)
    return TEMPLATES["count_colour"].format(colour=scene.count_colour), NUMBERS[k]


def _above_below(scene, rng):
    named = _unique(scene.objects, lambda o: (o.colour, o.shape))
    apart = [(a, b) for i, a in enumerate(named) for b in named[i + 1:] if abs(a.y - b.y) >= MIN_SEPARATION]
    if not apart:
        return None
    a, b = apart[int(rng.integers(len(apart)))]
    upper, lower = (a, b) if a.y < b.y else (b, a)
    if rng.random() < 0.5:
        return TEMPLATES["above_below"].format(a=upper.name, b=lower.name), "yes"
    return TEMPLATES["above_below"].format(a=lower.name, b=upper.name), "no"


QUESTION_MAKERS = {
    "shape_of_colour": _shape_of_colour, "colour_of_shape": _colour_of_shape, "pope": _pope,
    "count_colour": _count_colour, "above_below": _above_below,
}


def questions(split: str, count: int, types=QUESTION_TYPES, start: int = 0):
    """The first `count` (scene, question) pairs of `split` whose type is in `types`, visiting scenes
    in order from `start` and asking each scene's questions in QUESTION_TYPES order."""
    return ask(scene, QUESTION_TYPES, "ShapesVQA-dense", split, count, types, start)
