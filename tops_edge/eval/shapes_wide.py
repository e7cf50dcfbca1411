"""ShapesVQA-wide: ShapesVQA-dense's crowded scenes on wide and tall canvases, for LLaVA-NeXT.

Even scene indices are 672x336 (wide), odd ones 336x672 (tall): each an exact 1x2 or 2x1 grid of
LLaVA-NeXT's 336px crops, so anyres sees every part of the scene at full resolution while
LLaVA-1.5's single 336px view (resize the short side, centre-crop) would lose half of it. A scene has
16-28 objects (about twice shapesvqa-dense's 8-16 on twice the area, so as crowded), drawn, placed
and planted exactly as shapesvqa-dense's (eval/shapes_dense.py: `build_scene`, the same object
sizes, margins and planted referents), and asks the same five question types with the same
templates and answers (zero .. five for count_colour, yes / no balanced for pope and above_below).

Splits follow ShapesVQA's seed scheme with generator streams of their own (0xE0 scenes, 0xE1
questions), so scene i of split s is drawn from its own generator, train, val and test never share a
scene, and none is a shapesvqa or shapesvqa-dense scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import shapes_dense
from .shapes import ask
from .shapes_dense import ANSWER_KIND, QUESTION_TYPES, TEMPLATES, render  # noqa: F401  (the task's own API)

WIDE, TALL = (672, 336), (336, 672)  # (width, height) in pixels
MIN_OBJECTS, MAX_OBJECTS = 16, 28
_SCENE_STREAM, _QUESTION_STREAM = 0xE0, 0xE1  # shapesvqa: 0, 1; shapesvqa-dense: 0xD0, 0xD1


@dataclass(frozen=True)
class Scene(shapes_dense.Scene):
    """A shapesvqa-dense scene with its own canvas size and question stream."""

    width: int = WIDE[0]
    height: int = WIDE[1]
    question_stream: ClassVar[int] = _QUESTION_STREAM

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def canvas(index: int) -> tuple[int, int]:
    """(width, height) of scene `index`: wide for even indices, tall for odd ones."""
    return WIDE if index % 2 == 0 else TALL


def scene(split: str, index: int) -> Scene:
    """Scene `index` of `split`: 16-28 small, non-overlapping objects around planted referents, on
    the canvas `canvas(index)`."""
    size = canvas(index)
    objects, counted = shapes_dense.build_scene(split, index, _SCENE_STREAM, (MIN_OBJECTS, MAX_OBJECTS), size)
    return Scene(split, index, objects, counted, *size)


def questions(split: str, count: int, types=QUESTION_TYPES, start: int = 0):
    """The first `count` (scene, question) pairs of `split` whose type is in `types`, visiting scenes
    in order from `start` and asking each scene's questions in QUESTION_TYPES order."""
    return ask(scene, QUESTION_TYPES, "ShapesVQA-wide", split, count, types, start)
