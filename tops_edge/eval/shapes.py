"""ShapesVQA: a deterministic synthetic VQA task whose answers depend on the question *and* on
specific image regions, so visual-token pruning can lose them.

A scene is a 336x336 image with 2-5 non-overlapping shapes, each a (shape, colour, size) at a random
place on a plain light background. Questions and answers come from closed vocabularies:

  colour_exist    "Is there a red object?"                      yes / no (balanced)
  shape_of_colour "What shape is the red object?"               a shape (one object of that colour)
  colour_of_shape "What color is the circle?"                   a colour (one object of that shape)
  pope            "Is there a red circle?"                      yes / no; absent pairs are adversarial
                                                                (the colour and the shape both appear,
                                                                not together) when the scene allows
  count           "How many objects are there?"                 two .. five
  left_right      "Is the red circle left of the blue square?"  yes / no

Splits are fixed by seed: scene i of split s is drawn from its own generator, so a split's items do
not depend on how many were asked for, and train, val and test never share a scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 336
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 130, 20),
}
SIZES = {"small": 22, "large": 40}  # half-widths in pixels
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
QUESTION_TYPES = ("colour_exist", "shape_of_colour", "colour_of_shape", "pope", "count", "left_right")
ANSWER_KIND = {  # how each type is scored (tasks.score)
    "colour_exist": "yesno", "shape_of_colour": "short", "colour_of_shape": "short",
    "pope": "yesno", "count": "short", "left_right": "yesno",
}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
BACKGROUND = (235, 235, 230)
MIN_OBJECTS, MAX_OBJECTS = 2, 5


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: int  # centre, pixels
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Question:
    qtype: str
    question: str
    answer: str

    @property
    def kind(self) -> str:
        return ANSWER_KIND[self.qtype]


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    objects: tuple[Obj, ...]

    def image(self):
        return render(self.objects)

    def questions(self) -> list[Question]:
        """One question of each type the scene allows, drawn from the scene's own generator."""
        rng = _rng(self.split, self.index, stream=1)
        out = []
        for qtype in QUESTION_TYPES:
            q = QUESTION_MAKERS[qtype](self.objects, rng)
            if q is not None:
                out.append(Question(qtype, *q))
        return out


def _rng(split: str, index: int, stream: int = 0) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLIT_SEEDS)}")
    return np.random.default_rng([SPLIT_SEEDS[split], index, stream, 0x5EED])


def scene(split: str, index: int) -> Scene:
    """Scene `index` of `split`: 2-5 distinct (colour, shape) objects that do not overlap."""
    rng = _rng(split, index)
    count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    objects: list[Obj] = []
    pairs = set()
    while len(objects) < count:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        if (colour, shape) in pairs:
            continue
        size = list(SIZES)[rng.integers(len(SIZES))]
        r = SIZES[size]
        for _ in range(100):
            x, y = (int(v) for v in rng.integers(r + 4, SIZE - r - 4, size=2))
            if all(abs(x - o.x) > r + SIZES[o.size] + 6 or abs(y - o.y) > r + SIZES[o.size] + 6 for o in objects) and \
               all(abs(x - o.x) > 8 for o in objects):  # distinct x, so left/right is never a tie
                break
        else:
            continue
        objects.append(Obj(shape, colour, size, x, y))
        pairs.add((colour, shape))
    return Scene(split, index, tuple(objects))


def render(objects) -> "Image.Image":  # noqa: F821
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw_shape(draw, o.shape, o.x, o.y, SIZES[o.size], COLOURS[o.colour])
    return img


def draw_shape(draw, shape: str, x: int, y: int, r: int, fill) -> None:
    """One shape of half-width `r` centred at (x, y) on a PIL ImageDraw (shapesvqa-dense draws its
    smaller objects with it too)."""
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        s = int(r * 0.85)
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + int(r * 0.8)), (x + r, y + int(r * 0.8))], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    elif shape == "cross":
        w = max(4, r // 3)
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    else:
        raise ValueError(f"unknown shape '{shape}'")


# --- question makers: (objects, rng) -> (question, answer) or None when the scene does not allow it
def _colour_exist(objects, rng):
    present = sorted({o.colour for o in objects})
    absent = [c for c in COLOURS if c not in present]
    if rng.random() < 0.5 or not absent:
        return f"Is there a {present[rng.integers(len(present))]} object?", "yes"
    return f"Is there a {absent[rng.integers(len(absent))]} object?", "no"


def _unique(objects, key):
    counts: dict[str, int] = {}
    for o in objects:
        counts[getattr(o, key)] = counts.get(getattr(o, key), 0) + 1
    return [o for o in objects if counts[getattr(o, key)] == 1]


def _shape_of_colour(objects, rng):
    unique = _unique(objects, "colour")
    if not unique:
        return None
    o = unique[rng.integers(len(unique))]
    return f"What shape is the {o.colour} object?", o.shape


def _colour_of_shape(objects, rng):
    unique = _unique(objects, "shape")
    if not unique:
        return None
    o = unique[rng.integers(len(unique))]
    return f"What color is the {o.shape}?", o.colour


def _pope(objects, rng):
    pairs = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        o = objects[rng.integers(len(objects))]
        return f"Is there a {o.colour} {o.shape}?", "yes"
    colours, shapes = {o.colour for o in objects}, {o.shape for o in objects}
    adversarial = sorted((c, s) for c in colours for s in shapes if (c, s) not in pairs)
    pool = adversarial or sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs)
    c, s = pool[rng.integers(len(pool))]
    return f"Is there a {c} {s}?", "no"


def _count(objects, rng):
    return "How many objects are there?", NUMBERS[len(objects)]


def _left_right(objects, rng):
    i, j = rng.choice(len(objects), 2, replace=False)
    a, b = objects[int(i)], objects[int(j)]
    return f"Is the {a.name} left of the {b.name}?", "yes" if a.x < b.x else "no"


QUESTION_MAKERS = {
    "colour_exist": _colour_exist, "shape_of_colour": _shape_of_colour, "colour_of_shape": _colour_of_shape,
    "pope": _pope, "count": _count, "left_right": _left_right,
}


def questions(split: str, count: int, types=QUESTION_TYPES, start: int = 0):
    """The first `count` (scene, question) pairs of `split` whose type is in `types`, visiting scenes
    in order from `start` and asking each scene's questions in QUESTION_TYPES order."""
    return ask(scene, QUESTION_TYPES, "ShapesVQA", split, count, types, start)


def ask(scene_of, known, task: str, split: str, count: int, types, start: int):
    """`questions` for any scene generator `scene_of(split, index)` whose scenes ask the `known` types
    (shapesvqa-dense uses it too)."""
    unknown = [t for t in types if t not in known]
    if unknown:
        raise ValueError(f"unknown {task} question type(s) {unknown}; choose from {', '.join(known)}")
    out = []
    index = start
    while len(out) < count:
        s = scene_of(split, index)
        for q in s.questions():
            if q.qtype in types and len(out) < count:
                out.append((s, q))
        index += 1
    return out
