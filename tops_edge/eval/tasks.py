"""Evaluation tasks: items (image, question, answer, kind, category) and LLaVA-style scoring.

Built in: `shapesvqa` (eval/shapes.py), `shapesvqa-dense` (eval/shapes_dense.py: crowded scenes) and
`shapesvqa-wide` (eval/shapes_wide.py: crowded 672x336 and 336x672 scenes, for LLaVA-NeXT), by default
their test splits. User tasks are JSONL files, one item per line:

    {"image": "images/0001.jpg", "question": "Is there a dog?", "answer": "yes", "type": "yesno"}
    {"image": "q2.png", "question": "Which is larger?\\nA. cat\\nB. dog", "answer": "B", "type": "choice",
     "category": "scienceqa"}
    {"image": "q3.png", "question": "What color is the bus?", "answer": ["red", "dark red"], "type": "short"}

`image` is relative to the JSONL file's directory (or absolute); `category` (default: the type) groups
the table's rows; `answer` may be a list of accepted answers for `short`. Scoring follows the LLaVA
eval scripts: `yesno` as POPE (an answer with "no" or "not" in its first sentence is no, anything
else yes), `choice` as ScienceQA/MMBench (the option letter the answer starts with), `short` as VQAv2
(lower case, punctuation and articles dropped, number words as digits, then an exact match).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, check_count

KINDS = ("yesno", "choice", "short")
#: LLaVA-1.5's answer-format instructions, appended to the question
SUFFIX = {
    "yesno": "Answer the question using a single word or phrase.",
    "short": "Answer the question using a single word or phrase.",
    "choice": "Answer with the option's letter from the given choices directly.",
}


@dataclass(frozen=True)
class Item:
    image: object  # a path or a PIL image
    question: str
    answer: tuple[str, ...]  # accepted answers
    kind: str
    category: str

    @property
    def prompt(self) -> str:
        return f"{self.question}\n{SUFFIX[self.kind]}"


def _generators() -> dict:
    """The built-in tasks' scene generators, by task name."""
    from . import shapes, shapes_dense, shapes_wide

    return {"shapesvqa": shapes, "shapesvqa-dense": shapes_dense, "shapesvqa-wide": shapes_wide}


def shapesvqa(count: int = 1000, split: str = "test", types=None, skip: int = 0, dense: bool = False,
              task: str | None = None) -> list[Item]:
    """Questions `skip` .. `skip + count - 1` of `split` of the built-in `task` (default: ShapesVQA, or
    ShapesVQA-dense with `dense`); only their scenes are rendered."""
    task = task or ("shapesvqa-dense" if dense else "shapesvqa")
    if dense and task != "shapesvqa-dense":
        raise InputError(f"dense=True asks for shapesvqa-dense, but task is '{task}'")
    generators = _generators()
    if task not in generators:
        raise InputError(f"unknown built-in task '{task}'; choose one of {', '.join(generators)}")
    generator = generators[task]
    types = tuple(types) if types else generator.QUESTION_TYPES
    try:
        pairs = generator.questions(split, skip + count, types)[skip:]
    except ValueError as exc:
        raise InputError(str(exc)) from None
    images: dict[int, object] = {}
    items = []
    for scene, q in pairs:
        if scene.index not in images:
            images[scene.index] = scene.image()
        items.append(Item(images[scene.index], q.question, (q.answer,), q.kind, q.qtype))
    return items


def load_jsonl(path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"task file {path} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: each line must be a JSON object")
            missing = [k for k in ("image", "question", "answer", "type") if k not in rec]
            if missing:
                raise InputError(f"{where}: missing {', '.join(missing)}")
            kind = rec["type"]
            if kind not in KINDS:
                raise InputError(f"{where}: type '{kind}' is not one of {', '.join(KINDS)}")
            answers = rec["answer"] if isinstance(rec["answer"], list) else [rec["answer"]]
            if not answers or not all(isinstance(a, (str, int)) for a in answers):
                raise InputError(f"{where}: answer must be a string or a list of strings")
            image = Path(rec["image"])
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise InputError(f"{where}: image {image} does not exist")
            items.append(Item(image, str(rec["question"]), tuple(str(a) for a in answers), kind,
                              str(rec.get("category", kind))))
    if not items:
        raise InputError(f"task file {path} has no items")
    return items


#: the tasks built in (rendered on the fly, with train / val / test splits)
BUILTIN_TASKS = ("shapesvqa", "shapesvqa-dense", "shapesvqa-wide")


def load_task(task: str, limit: int | None = None, types=None, split: str = "test", skip: int = 0) -> list[Item]:
    """`shapesvqa`, `shapesvqa-dense` or `shapesvqa-wide` (its `split`: test, or val to tune selector
    parameters without touching the test questions) or a path to a JSONL file; `skip` drops the first
    items (a fresh sample of ShapesVQA, or one shard of a long run), then `limit` keeps the first of
    the rest."""
    limit = None if limit is None else check_count("--limit", limit, 1)
    skip = check_count("--skip", skip, 0)
    if task in BUILTIN_TASKS:
        if split not in ("val", "test"):
            raise InputError(f"--split must be val or test (train is what the model learned from), got '{split}'")
        return shapesvqa(1000 if limit is None else limit, split=split, types=types, skip=skip, task=task)
    if not task.endswith(".jsonl") and not Path(task).is_file():
        raise InputError(f"unknown task '{task}': use shapesvqa, shapesvqa-dense, shapesvqa-wide or a path to a .jsonl "
                         "file")
    items = load_jsonl(task)[skip:]
    if not items:
        raise InputError(f"--skip {skip} leaves none of the items of {task}")
    return items if limit is None else items[:limit]


# --- scoring ------------------------------------------------------------------------------------
_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}


def normalize_short(text: str) -> str:
    """VQAv2-style normalisation: lower case, no punctuation, no articles, number words as digits."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def yes_no(text: str) -> str:
    """POPE's rule (LLaVA eval_pope): the first sentence; 'no' or 'not' among its words means no."""
    first = text.split(".")[0].replace(",", "")
    words = [w.lower() for w in first.split()]
    return "no" if "no" in words or "not" in words else "yes"


def choice_letter(text: str) -> str | None:
    """The option letter an answer starts with: "B", "B.", "(B) dog", "B: dog"."""
    m = re.match(r"\s*\(?([A-Z])(?:[\).:,\s]|$)", text)
    return m.group(1) if m else None


def score(item: Item, prediction: str) -> bool:
    if item.kind == "yesno":
        return yes_no(prediction) == normalize_short(item.answer[0])
    if item.kind == "choice":
        return choice_letter(prediction) == item.answer[0].strip().upper()
    pred = normalize_short(prediction)
    return any(pred == normalize_short(a) for a in item.answer)
