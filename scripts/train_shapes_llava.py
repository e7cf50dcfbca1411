"""Train a tiny LLaVA-1.5 (or, with --next, LLaVA-NeXT) on ShapesVQA and save it in HF format
(`tops-export --model DIR` reads it).

    python scripts/train_shapes_llava.py --out runs/shapes --vision-minutes 15 --lm-minutes 60
    python scripts/train_shapes_llava.py --out runs/shapes --resume runs/shapes/checkpoint.pt --lm-minutes 30
    python scripts/train_shapes_llava.py --smoke --out /tmp/smoke      # seconds: checks the machinery only
    python scripts/train_shapes_llava.py --out runs/deep --init-from tops_edge/assets/shapes-llava --grow-layers 6 \
        --tasks shapesvqa,shapesvqa-dense --lm-minutes 120   # a deeper Llama grown from a trained model
    python scripts/train_shapes_llava.py --out runs/next --init-from tops_edge/assets/shapes-llava-deep --next \
        --tasks shapesvqa-wide,shapesvqa-dense --train-scenes 4000 --val-scenes 100 --threads 2 --word-aux 0 \
        --eval-every 500 --lm-steps 1000 --lm-minutes 240   # LLaVA-NeXT (anyres); see "LLaVA-NeXT" below

The model is LLaVA-1.5 in miniature: a CLIP ViT at 336px/14 (576 visual tokens; 4 layers of width
64, features from layer -2 as LLaVA does), LLaVA's 2-layer GELU projector, and a Llama (width 128)
with a word-level tokenizer over ShapesVQA's closed vocabulary and LLaVA-1.5's chat template.

Stage 1 (the stand-in for CLIP pretraining): the tower alone, with dense per-patch labels (colour,
shape and size of the object under the patch, and the patch's offset to that object's centre;
background patches down-weighted).
Stage 2 (the stand-in for LLaVA's instruction tuning): the tower frozen; its features standardised
(the scaling is folded into the projector's first layer when saving, so the saved model is plain
LLaVA), then the projector and the Llama trained on multi-turn ShapesVQA conversations, the loss on
the answers (each followed by </s>). An auxiliary per-patch loss keeps colour and shape linearly
readable from the projected tokens.

`--tasks shapesvqa,shapesvqa-dense` mixes both tasks' train scenes (`--train-scenes` of each; the
validation types of ShapesVQA-dense are logged as "dense/<type>"); the word-level vocabulary then
covers both tasks' words.

`--init-from DIR` starts from a trained HF-format model (e.g. the committed one) instead: its tower
and feature layer are kept frozen and stage 1 is skipped; its projector (standardisation unfolded)
and Llama go on to stage 2. `--grow-layers N` first inserts N Llama decoder layers, LLaMA-Pro style:
each a copy of the layer before it with `o_proj` and `down_proj` zeroed, so it starts as the identity
and the grown model computes what the original did. Words the tokenizer lacks (those of
ShapesVQA-dense) are appended: old token ids keep their rows, new embedding and LM-head rows start at
the mean of the old ones.

LLaVA-NeXT (`--next`, with `--init-from` a trained LLaVA-1.5): the model becomes a
LlavaNextForConditionalGeneration with the same tower, feature layer, projector and Llama (the
weights copied; the Llama's context raised to 2048, which RoPE does not notice) and
`image_grid_pinpoints` 336x336, 672x336 and 336x672 (NEXT_PINPOINTS): a 336 scene is its base view
plus one crop, a shapesvqa-wide scene (672x336 or 336x672) its base view plus a 1x2 or 2x1 grid of
336px crops, so the tower still reads 336px images. The processor is a LlavaNextProcessor around the
checkpoint's tokenizer, with its image processor's resize, crop, rescale and normalisation settings.
`image_newline` starts as the mean projected token over background patches (init_newline: a token
the LLaVA-1.5 Llama already reads as "no object here", where zeros or HF's random init would be
inputs it has never seen); it trains with the projector and the Llama (stage 2; the tower stays
frozen, stage 1 and --tune-tower do not run). Each train scene's crops go through the tower once
(their features cached in fp16, like LLaVA-1.5's); a batch projects them and packs them with HF's
own `LlavaNextModel.pack_image_features` (base view, then the crops stitched, unpadded, a newline
after each row), so the sequence the Llama trains on is the one HF's forward builds from pixel values
(tests: the logits agree to 1e-4 for fp32 features). The default task is shapesvqa-wide ("wide/<type>"
in the logs); `--tasks` may add the 336 tasks. checkpoint.pt keeps the NeXT config and image-processor
settings, so `--resume` rebuilds the NeXT model without `--next`.

Cost (pilot, 2 minutes of stage 2 from the 8-layer deep checkpoint on shapesvqa-wide + shapesvqa-dense):
a NeXT sequence is 1200-1900 tokens against LLaVA-1.5's ~700, so a step costs about 4-5x as much:
24 s/step at --lm-batch 16 on 1 thread while a LLaVA-1.5 training (2 threads) ran on the same 2 cores
(peak RSS 8.2 GB; 5.4 GB at --lm-batch 8). Scaled from that LLaVA-1.5 run's 2.4 s/step when alone,
expect about 10-12 s/step at batch 16 on 2 free threads, i.e. about 3 hours for the 1000 steps of the
command above (plus about 10 minutes to cache the tower features of 4000 + 4000 scenes and a few
minutes per validation pass of 100 + 100 scenes). Nothing has been trained with it beyond pilots.

Progress goes to stderr and `log.jsonl`; `checkpoint.pt` lets a later run resume (it keeps the
model's config and vocabulary, so a grown model resumes as it is); each stage ends with a per-type
validation accuracy. Training uses only the `train` split; `val` picks nothing but is reported;
`tops-eval` measures `test`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tops_edge.eval import shapes, shapes_dense, shapes_wide  # noqa: E402
from tops_edge.eval.tasks import SUFFIX  # noqa: E402

SIDE, PATCH = 24, 14
COLOURS, SHAPE_NAMES, SIZE_NAMES = list(shapes.COLOURS), list(shapes.SHAPES), list(shapes.SIZES)
#: the tasks a run can train on: their scene generators, and the prefix of their types in the logs
TASKS = {"shapesvqa": (shapes, ""), "shapesvqa-dense": (shapes_dense, "dense/"), "shapesvqa-wide": (shapes_wide, "wide/")}
DENSE_SIZE = "small"  # ShapesVQA-dense objects (half-widths 12-22) are at most ShapesVQA's small (22)
#: --next: the anyres resolutions, (height, width): one 336px crop for a square scene, 1x2 for a wide
#: (672x336) and 2x1 for a tall (336x672) one, each scene an exact grid of crops (no resize, no padding)
NEXT_PINPOINTS = ((336, 336), (336, 672), (672, 336))


class Turn(NamedTuple):
    """One question of a training conversation; `qtype` carries its task's log prefix."""
    qtype: str
    question: str
    answer: str


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SystemExit(f"train_shapes_llava: --tasks takes a comma-separated list of {', '.join(TASKS)}, "
                         f"got '{text}'")
    return tuple(dict.fromkeys(tasks))


# --- data -------------------------------------------------------------------------------------
def patch_labels(scene) -> dict[str, np.ndarray]:
    """Per patch (576): colour, shape, size class of the object covering it (0 = background) and the
    offset from the patch centre to the object's centre in patches."""
    colour = np.zeros(SIDE * SIDE, np.int64)
    shape = np.zeros(SIDE * SIDE, np.int64)
    size = np.zeros(SIDE * SIDE, np.int64)
    offset = np.zeros((SIDE * SIDE, 2), np.float32)
    centres = (np.arange(SIDE) + 0.5) * PATCH
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    dense = isinstance(scene, shapes_dense.Scene)
    for o in scene.objects:
        pixels = np.asarray((shapes_dense if dense else shapes).render([o]))
        cover = np.any(pixels != np.array(shapes.BACKGROUND), -1).reshape(SIDE, PATCH, SIDE, PATCH).mean((1, 3))
        mask = (cover > 0.3).reshape(-1)
        colour[mask] = 1 + COLOURS.index(o.colour)
        shape[mask] = 1 + SHAPE_NAMES.index(o.shape)
        size[mask] = 1 + SIZE_NAMES.index(DENSE_SIZE if dense else o.size)
        offset[mask, 0] = ((o.x - cx) / PATCH).reshape(-1)[mask]
        offset[mask, 1] = ((o.y - cy) / PATCH).reshape(-1)[mask]
    return {"colour": colour, "shape": shape, "size": size, "offset": offset}


class SceneBank:
    """Scenes of one split rendered once: pixel values (CLIP-normalised, fp16) and patch labels;
    `count` scenes of each of `tasks`, one after the other."""

    def __init__(self, processor, split: str, count: int, log, tasks=("shapesvqa",)):
        self.split = split
        made = [(TASKS[t][1], TASKS[t][0].scene(split, i)) for t in tasks for i in range(count)]
        self.scenes = [s for _, s in made]
        count = len(self.scenes)
        t = time.time()
        chunks = []  # in chunks: the processor's fp32 output for 6000 scenes alone would be 8 GB
        for start in range(0, count, 256):
            images = [s.image() for s in self.scenes[start:start + 256]]
            pv = processor.image_processor(images=images, return_tensors="np")["pixel_values"]
            chunks.append(torch.from_numpy(np.asarray(pv, np.float16)))
        self.pixels = torch.cat(chunks)
        labels = [patch_labels(s) for s in self.scenes]
        self.labels = {k: torch.from_numpy(np.stack([lab[k] for lab in labels])) for k in labels[0]}
        self.questions = [[Turn(prefix + q.qtype, q.question, q.answer) for q in s.questions()] for prefix, s in made]
        log(f"{split}: {count} scenes ({', '.join(tasks)}) rendered and labelled in {time.time() - t:.0f}s")

    def __len__(self):
        return len(self.scenes)

    def pixel_batches(self, size: int = 64):
        """The scenes' pixel values, `size` at a time, in order (what the tower reads)."""
        for start in range(0, len(self), size):
            yield self.pixels[start:start + size]


def _object_radius(o) -> int:
    return o.r if hasattr(o, "r") else shapes.SIZES[o.size]


def crop_labels(scene, grid: tuple[int, int], crop: int = SIDE * PATCH) -> dict[str, np.ndarray]:
    """patch_labels for each anyres crop of `scene` ([1 + rows * cols, 576] each): the base view (the
    whole scene resized to crop x crop, so a patch covers width/24 x height/24 scene pixels), then the
    `grid` (rows, cols) of crop x crop tiles in row-major order, as LlavaNextImageProcessor cuts a
    scene that is an exact grid of crops (the scenes here are: see NEXT_PINPOINTS). The offsets are
    in patches of each crop's own grid. For a 336 scene both crops' labels are patch_labels'."""
    width, height = getattr(scene, "size", (shapes.SIZE, shapes.SIZE))
    rows, cols = grid
    if (height, width) != (rows * crop, cols * crop):
        raise ValueError(f"a {width}x{height} scene is not a {rows}x{cols} grid of {crop}px crops")
    pixels = np.asarray(scene.image())
    ink = np.any(pixels != np.array(shapes.BACKGROUND), -1)
    owner = np.zeros(ink.shape, np.int64)  # 1 + the object whose box holds the pixel (boxes never overlap)
    for j, o in enumerate(scene.objects):
        r = _object_radius(o)
        box = (slice(max(o.y - r, 0), o.y + r + 1), slice(max(o.x - r, 0), o.x + r + 1))
        owner[box] = np.where(ink[box], j + 1, owner[box])
    regions = [(0, 0, width // SIDE, height // SIDE)]  # (x0, y0, patch width, patch height) in scene pixels
    regions += [(c * crop, r * crop, PATCH, PATCH) for r in range(rows) for c in range(cols)]
    n = len(scene.objects) + 1
    out = {"colour": np.zeros((len(regions), SIDE * SIDE), np.int64), "shape": np.zeros((len(regions), SIDE * SIDE), np.int64),
           "size": np.zeros((len(regions), SIDE * SIDE), np.int64),
           "offset": np.zeros((len(regions), SIDE * SIDE, 2), np.float32)}
    dense = isinstance(scene, shapes_dense.Scene)
    for k, (x0, y0, pw, ph) in enumerate(regions):
        assert pw * SIDE <= width and ph * SIDE <= height and pw * SIDE * ph * SIDE > 0
        window = owner[y0:y0 + ph * SIDE, x0:x0 + pw * SIDE]
        cell = (np.arange(SIDE * ph)[:, None] // ph) * SIDE + np.arange(SIDE * pw)[None, :] // pw
        cover = np.bincount((cell * n + window).reshape(-1), minlength=SIDE * SIDE * n).reshape(SIDE * SIDE, n) / (pw * ph)
        cx = x0 + (np.arange(SIDE * SIDE) % SIDE + 0.5) * pw
        cy = y0 + (np.arange(SIDE * SIDE) // SIDE + 0.5) * ph
        for j, o in enumerate(scene.objects):  # in the scene's order: a later object wins a shared patch
            mask = cover[:, j + 1] > 0.3
            out["colour"][k, mask] = 1 + COLOURS.index(o.colour)
            out["shape"][k, mask] = 1 + SHAPE_NAMES.index(o.shape)
            out["size"][k, mask] = 1 + SIZE_NAMES.index(DENSE_SIZE if dense else o.size)
            out["offset"][k, mask, 0] = ((o.x - cx) / pw)[mask]
            out["offset"][k, mask, 1] = ((o.y - cy) / ph)[mask]
    return out


class AnyresBank:
    """Scenes of one split for LLaVA-NeXT: each scene cut into its anyres crops (the base view, then
    the crop grid, as `processor`'s LlavaNextImageProcessor cuts it), patch labels per crop, and the
    questions; `count` scenes of each of `tasks`. The crops' pixel values are not kept (a 672x336
    scene is 3 crops, 2 MB in fp16): `pixel_batches` renders and processes the scenes again whenever
    the tower runs over them."""

    def __init__(self, processor, split: str, count: int, log, tasks=("shapesvqa-wide",)):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        self.split, self.processor = split, processor
        made = [(TASKS[t][1], TASKS[t][0].scene(split, i)) for t in tasks for i in range(count)]
        self.scenes = [s for _, s in made]
        t = time.time()
        pinpoints = [list(p) for p in processor.image_processor.image_grid_pinpoints]
        crop = processor.image_processor.crop_size["height"]
        #: (height, width) of each scene, as the processor reports image_sizes
        self.image_sizes = [tuple(reversed(getattr(s, "size", (shapes.SIZE, shapes.SIZE)))) for s in self.scenes]
        self.num_crops = [image_size_to_num_patches(list(hw), pinpoints, crop) for hw in self.image_sizes]
        self.crop_start = np.concatenate([[0], np.cumsum(self.num_crops)[:-1]]).astype(np.int64)
        grids = [_crop_grid(hw, pinpoints, crop) for hw in self.image_sizes]
        labels = [crop_labels(s, g, crop) for s, g in zip(self.scenes, grids)]
        self.labels = {k: torch.from_numpy(np.concatenate([lab[k] for lab in labels])) for k in labels[0]}
        self.questions = [[Turn(prefix + q.qtype, q.question, q.answer) for q in s.questions()] for prefix, s in made]
        log(f"{split}: {len(self)} scenes ({', '.join(tasks)}), {sum(self.num_crops)} anyres crops labelled in "
            f"{time.time() - t:.0f}s")

    def __len__(self):
        return len(self.scenes)

    def crops(self, i: int) -> torch.Tensor:
        """Indices of scene i's crops in the flat [crops, ...] tensors (labels, cached features)."""
        return torch.arange(int(self.crop_start[i]), int(self.crop_start[i]) + self.num_crops[i])

    def pixel_batches(self, size: int = 64):
        """The crops' pixel values in order (scene by scene, base view first), about `size` crops at a
        time, each batch the processor's output for whole scenes with its padding crops dropped."""
        per = max(1, size // max(self.num_crops))
        for start in range(0, len(self), per):
            scenes = range(start, min(start + per, len(self)))
            out = self.processor.image_processor(images=[self.scenes[i].image() for i in scenes], return_tensors="np")
            for i, hw, pv in zip(scenes, out["image_sizes"], out["pixel_values"]):
                assert tuple(int(v) for v in hw) == self.image_sizes[i]
            yield torch.cat([torch.from_numpy(np.asarray(pv[:self.num_crops[i]], np.float32))
                             for i, pv in zip(scenes, out["pixel_values"])])


def _crop_grid(image_size, pinpoints, crop: int) -> tuple[int, int]:
    """(rows, cols) of crops LLaVA-NeXT cuts an image of (height, width) into."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(list(image_size), pinpoints)
    return height // crop, width // crop


def vocabulary(tasks=("shapesvqa",)) -> list[str]:
    """Every word the chat template, the answer-format suffixes and the tasks' questions and answers
    can produce (ShapesVQA's are always in)."""
    words = {"user", "assistant", ":", "?", ".", ",", "'"}
    for text in SUFFIX.values():
        words |= set(re.findall(r"\w+|[^\w\s]", text.lower()))
    templates = ["is there a {c} object", "what shape is the {c} object", "what color is the {s}", "is there a {c} {s}",
                 "how many objects are there", "is the {c} {s} left of the {c} {s}"]
    for t in templates:
        words |= set(re.findall(r"\w+", t.format(c="x", s="y"))) - {"x", "y"}
    if "shapesvqa-dense" in tasks or "shapesvqa-wide" in tasks:  # shapesvqa-wide asks shapesvqa-dense's questions
        for t in shapes_dense.TEMPLATES.values():
            text = t.lower().format(colour="x", shape="y", a="x y", b="x y")
            words |= set(re.findall(r"\w+|[^\w\s]", text)) - {"x", "y"}
    words |= set(COLOURS) | set(SHAPE_NAMES) | set(shapes.NUMBERS) | {"yes", "no"}
    return sorted(words)


def word_tokenizer(tokens: list[str], model_max_length: int = 1024):
    """The word-level tokenizer of `build_word_tokenizer` with the ids in the order of `tokens` (the
    specials first): a vocabulary grown from a checkpoint's keeps its old ids and appends the rest."""
    from transformers import AutoTokenizer

    from tops_edge.models.tiny import SPECIAL_TOKENS, build_word_tokenizer

    assert list(tokens[:len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS, "the special tokens come first"
    tok = build_word_tokenizer(tokens[len(SPECIAL_TOKENS):], model_max_length=model_max_length)
    if tok.convert_ids_to_tokens(list(range(len(tok)))) == list(tokens):
        return tok
    with tempfile.TemporaryDirectory() as tmp:  # the same tokenizer, its word -> id table reordered
        tok.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text())
        spec["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec))
        tok = AutoTokenizer.from_pretrained(tmp)
    tok.model_max_length = model_max_length
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == list(tokens)
    return tok


def grown_vocabulary(old: list[str], tasks) -> list[str]:
    """`old` (in id order) with the words of `tasks` it lacks appended, sorted."""
    return list(old) + sorted(set(vocabulary(tasks)) - set(old))


# --- models -----------------------------------------------------------------------------------
def build_model(seed: int, vision_layers: int, text_layers: int, text_width: int, heads: int, tasks=("shapesvqa",)):
    """(LlavaForConditionalGeneration, processor) with random weights: the architecture to train."""
    from transformers import LlavaForConditionalGeneration

    from tops_edge.models.tiny import IMAGE_TOKEN, build_word_tokenizer, tiny_llava_config

    tokenizer = build_word_tokenizer(vocabulary(tasks), model_max_length=1024)
    config = tiny_llava_config(
        tokenizer,
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=vision_layers, num_attention_heads=4),
        text=dict(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                  initializer_range=0.02),
    )
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return _finish(model, tokenizer)


def _finish(model, tokenizer, image_settings: dict | None = None):
    """(model, processor): the generation config and LLaVA-1.5's processor around `tokenizer`, or for
    a LLaVA-NeXT model LLaVA-NeXT's (`next_processor`, with `image_settings`)."""
    from transformers import GenerationConfig

    from tops_edge.models.tiny import build_processor

    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    if is_next(model):
        return model, next_processor(tokenizer, model.config, image_settings)
    vc = model.config.vision_config
    processor = build_processor(tokenizer, vc.image_size, vc.patch_size, model.config.vision_feature_select_strategy)
    return model, processor


def is_next(model) -> bool:
    return model.config.model_type == "llava_next"


def _model_class(config):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration


def model_from(config: dict, tokens: list[str], seed: int, image_settings: dict | None = None):
    """(model, processor) of a saved architecture: a LlavaConfig (or LlavaNextConfig) dict and the
    vocabulary in id order (random weights drawn as build_model draws them); a NeXT model's image
    processor takes `image_settings`."""
    from transformers import LlavaConfig, LlavaNextConfig

    cfg = (LlavaNextConfig if config.get("model_type") == "llava_next" else LlavaConfig).from_dict(config)
    torch.manual_seed(seed)
    context = cfg.text_config.max_position_embeddings if cfg.model_type == "llava_next" else 1024
    return _finish(_model_class(cfg)(cfg), word_tokenizer(tokens, context), image_settings)


#: the image-processor settings a LLaVA-NeXT processor takes over from the LLaVA-1.5 checkpoint's
IMAGE_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                  "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def image_settings_of(image_processor) -> dict:
    """The IMAGE_SETTINGS of an image processor, as plain JSON-able values (kept in checkpoint.pt)."""
    d = image_processor.to_dict()
    out = {}
    for k in IMAGE_SETTINGS:
        if d.get(k) is not None:
            v = d[k]
            out[k] = dict(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v
    return out


def next_processor(tokenizer, config, image_settings: dict | None = None):
    """LlavaNextProcessor for a LlavaNextConfig: a LlavaNextImageProcessor with the config's
    `image_grid_pinpoints` and `image_settings` (the LLaVA-1.5 checkpoint's resize, crop, rescale and
    CLIP normalisation; by default those of build_processor: shortest edge and crop = the tower's
    image size), the chat template and image-token expansion of tiny.build_processor."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from tops_edge.models.tiny import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE

    vc = config.vision_config
    settings = dict(size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size})
    settings.update(image_settings or {})
    crop = settings["crop_size"]
    if (crop["height"], crop["width"]) != (vc.image_size, vc.image_size):
        raise SystemExit(f"train_shapes_llava: the image processor crops {crop['width']}x{crop['height']}, "
                         f"the tower reads {vc.image_size}x{vc.image_size}")
    image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
                                                 do_pad=True, **settings)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vc.patch_size,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              num_additional_image_tokens=1, image_token=IMAGE_TOKEN, chat_template=LLAVA_CHAT_TEMPLATE)


def next_context(config, pinpoints, text_room: int = 256) -> int:
    """A Llama context that holds the longest anyres image sequence of `pinpoints` (base view, every
    crop, one newline per stitched row) plus `text_room` text tokens, rounded up to 512, and never
    below the model's own."""
    vc = config.vision_config
    side, crop = vc.image_size // vc.patch_size, vc.image_size
    longest = max(side * side + (h // crop) * (w // crop) * side * side + (h // crop) * side for h, w in pinpoints)
    need = -(-(longest + text_room) // 512) * 512
    return max(config.text_config.max_position_embeddings, need)


@torch.no_grad()
def to_next(model, processor, pinpoints=NEXT_PINPOINTS, image_settings: dict | None = None):
    """(LlavaNextForConditionalGeneration, LlavaNextProcessor) of a LLaVA-1.5 `model`: the same vision
    tower, feature layer, projector and Llama (weights copied, the Llama's context raised to
    next_context), `pinpoints` as the anyres grid resolutions (every one a grid of the tower's crops)
    and `image_newline` set to zeros here; main() sets it from the data (init_newline) once the
    features are cached. Random draws do not move torch's generator."""
    from transformers import LlavaNextConfig

    cfg = model.config
    crop = cfg.vision_config.image_size
    if cfg.model_type != "llava":
        raise SystemExit(f"train_shapes_llava: --next converts a LLaVA-1.5 model; this one is '{cfg.model_type}'")
    if cfg.vision_feature_select_strategy != "default":
        raise SystemExit("train_shapes_llava: --next needs vision_feature_select_strategy 'default' (no [CLS] token)")
    if any(h % crop or w % crop for h, w in pinpoints):
        raise SystemExit(f"train_shapes_llava: pinpoints {pinpoints} are not grids of the tower's {crop}px crops")
    d = cfg.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        d.pop(k, None)
    d["text_config"]["max_position_embeddings"] = next_context(cfg, pinpoints)
    d.update(image_grid_pinpoints=[list(p) for p in pinpoints], image_seq_length=(crop // cfg.vision_config.patch_size) ** 2)
    next_cfg = LlavaNextConfig(**d)
    with torch.random.fork_rng(devices=[]):
        converted = _model_class(next_cfg)(next_cfg)
    state = dict(model.state_dict())
    state["model.image_newline"] = torch.zeros(cfg.text_config.hidden_size)
    converted.load_state_dict(state)  # strict: every tensor of the NeXT model comes from the LLaVA-1.5 one
    converted.train(model.training)
    tokenizer = processor.tokenizer
    tokenizer.model_max_length = next_cfg.text_config.max_position_embeddings
    return _finish(converted, tokenizer, image_settings)


@torch.no_grad()
def init_newline(model, bank, feats, crops: int = 1024) -> torch.Tensor:
    """Set `image_newline` to the mean projected token over the background patches (no object under
    them) of the first `crops` cached crops of `bank`, and return it: a newline that starts as a blank
    patch, an input the LLaVA-1.5 Llama has learned to read as "no object here" (zeros would be a
    vector it never saw, HF's random init noise), so the newlines after each stitched row start out
    as harmless as we know how to make them. Training then makes it a row marker."""
    n = min(crops, feats.shape[0])
    background = bank.labels["colour"][:n] == 0
    total, count = torch.zeros(model.config.text_config.hidden_size, dtype=torch.float64), 0
    for start in range(0, n, 64):
        proj = model.model.multi_modal_projector(feats[start:min(start + 64, n)].float())
        keep = background[start:start + len(proj)]
        total += proj[keep].double().sum(0)
        count += int(keep.sum())
    newline = (total / max(count, 1)).float()
    model.model.image_newline.copy_(newline)
    return newline


def tokens_of(tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def layer_sources(old_layers: int, new_layers: int) -> list[tuple[int, bool]]:
    """For each layer of the grown Llama, (the old layer it is, or copies, whether it is new): the
    new layers spread evenly, each after the old layer it copies (the later old layers take the
    remainder), e.g. 2 + 6 -> old 0, 3 new, old 1, 3 new."""
    out = []
    for i in range(old_layers):
        out.append((i, False))
        out += [(i, True)] * (new_layers // old_layers + (i >= old_layers - new_layers % old_layers))
    return out


@torch.no_grad()
def grow(model, new_layers: int, vocab_size: int):
    """A copy of `model` with `new_layers` more Llama decoder layers that start as the identity (a
    copy of the layer before, `o_proj` and `down_proj` zero: the residual stream passes unchanged)
    and `vocab_size` token rows (the old ids keep theirs; new embedding and LM-head rows are the mean
    of the old). On the old tokens its logits equal the original's."""
    config = copy.deepcopy(model.config)
    old_layers, old_vocab = config.text_config.num_hidden_layers, config.text_config.vocab_size
    assert new_layers >= 0 and vocab_size >= old_vocab
    config.text_config.num_hidden_layers = old_layers + new_layers
    config.text_config.vocab_size = vocab_size
    grown = type(model)(config)
    old = model.state_dict()
    state = {}
    prefix = "model.language_model.layers."
    for name, value in grown.state_dict().items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            source, new = layer_sources(old_layers, new_layers)[int(index)]
            value = old[f"{prefix}{source}.{rest}"].clone()
            if new and rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.bias",
                                "mlp.down_proj.bias"):
                value.zero_()
        elif name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            rows = old[name]
            value = torch.cat([rows, rows.mean(0, keepdim=True).expand(vocab_size - old_vocab, -1)])
        else:
            value = old[name].clone()
        state[name] = value
    grown.load_state_dict(state)
    grown.generation_config = copy.deepcopy(model.generation_config)
    return grown.train(model.training)


def init_from(directory, tasks, new_layers: int, log, seed: int = 0, to_anyres: bool = False):
    """(model, processor, state) for a run that starts from the trained HF model in `directory` (a
    LLaVA-1.5 or a LLaVA-NeXT one): grown by `new_layers` layers and to the vocabulary of `tasks`, its
    stage-1 record kept; with `to_anyres` a LLaVA-1.5 model is then converted to LLaVA-NeXT (to_next)."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    directory = Path(directory)
    original = _model_class(AutoConfig.from_pretrained(directory)).from_pretrained(directory, dtype=torch.float32).eval()
    image_settings = image_settings_of(AutoProcessor.from_pretrained(directory).image_processor)
    old_tokens = tokens_of(AutoTokenizer.from_pretrained(directory))
    tokens = grown_vocabulary(old_tokens, tasks)
    model = grow(original, new_layers, len(tokens))
    context = original.config.text_config.max_position_embeddings if is_next(original) else 1024
    model, processor = _finish(model, word_tokenizer(tokens, context), image_settings)
    info = json.loads((directory / "TRAINING.json").read_text()) if (directory / "TRAINING.json").is_file() else {}
    layers = original.config.text_config.num_hidden_layers
    parent = {"path": str(directory), "text_layers": layers, "grown_layers": new_layers,
              "added_tokens": tokens[len(old_tokens):],
              **{k: info[k] for k in ("vision_steps", "lm_steps", "history") if k in info}}
    log(f"from {directory}: Llama {layers} -> {layers + new_layers} layers, vocabulary {len(old_tokens)} -> "
        f"{len(tokens)} ({' '.join(parent['added_tokens']) or 'no new words'})")
    # the proof that growing changed nothing: one scene's first-turn logits, before and after
    ids = processor(images=shapes.scene("val", 0).image(), text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}],
        add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        before = original(**ids).logits
        after = model(**ids).logits[..., :before.shape[-1]]
    change = float((after - before).abs().max())
    log(f"grown model at init: max |logit change| {change:.1e}", stage="init", logit_change=change)
    state = {"vision_steps": info.get("vision_steps", 0), "parent": parent, "unfold_projector": True}
    if to_anyres and not is_next(model):
        model, processor = to_next(model, processor, image_settings=image_settings)
        parent["converted_to_next"] = {"image_grid_pinpoints": model.config.image_grid_pinpoints,
                                       "max_position_embeddings": model.config.text_config.max_position_embeddings}
        state["init_newline"] = True  # set from the cached features (init_newline), before any step
        log(f"converted to LLaVA-NeXT: pinpoints {model.config.image_grid_pinpoints} (height, width), context "
            f"{model.config.text_config.max_position_embeddings}")
    if is_next(model):
        state["image_processor"] = image_settings
    torch.manual_seed(seed)  # what is drawn next (the new dense heads) does not depend on the growing
    return model, processor, state


def unfold_standardisation(model, mean: torch.Tensor, std: torch.Tensor) -> None:
    """The inverse of fold_standardisation: projector'(standardise(f)) == projector(f), for a saved
    model (its scaling folded in) that goes on training on standardised features."""
    first = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        first.bias += (first.weight * mean).sum(1)
        first.weight.mul_(std)


def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The features LLaVA's projector reads: hidden_states[vision_feature_layer] without [CLS]."""
    out = model.model.vision_tower(pixels.float(), output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


class PatchHeads(nn.Module):
    """Dense heads: colour (7), shape (6), size (3) and centre offset (2) per token."""

    def __init__(self, width: int):
        super().__init__()
        self.colour, self.shape = nn.Linear(width, 1 + len(COLOURS)), nn.Linear(width, 1 + len(SHAPE_NAMES))
        self.size, self.offset = nn.Linear(width, 1 + len(SIZE_NAMES)), nn.Linear(width, 2)

    def loss(self, feats: torch.Tensor, labels: dict, background_weight: float = 0.1) -> tuple[torch.Tensor, dict]:
        fg = (labels["colour"] > 0).float()
        w = fg + background_weight * (1 - fg)
        ce = lambda head, y: (nn.functional.cross_entropy(head(feats).flatten(0, 1), y.flatten(), reduction="none")  # noqa: E731
                              * w.flatten()).sum() / w.sum()
        off = ((self.offset(feats) - labels["offset"]).pow(2).sum(-1) * fg).sum() / fg.sum().clamp(min=1) / 10
        parts = {"colour": ce(self.colour, labels["colour"]), "shape": ce(self.shape, labels["shape"]),
                 "size": ce(self.size, labels["size"]), "offset": off}
        return sum(parts.values()), parts

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, labels: dict) -> dict:
        fg = labels["colour"] > 0
        return {k: float((getattr(self, k)(feats).argmax(-1) == labels[k])[fg].float().mean())
                for k in ("colour", "shape", "size")}


def _heads(state: dict, key: str, width: int) -> PatchHeads:
    """The dense heads kept across stages and runs (as a state dict in the checkpoint)."""
    heads = PatchHeads(width)
    if key in state:
        heads.load_state_dict(state[key])
    state[key] = heads.state_dict()  # tensors shared with the module: saved as trained
    return heads


# --- stage 1 ----------------------------------------------------------------------------------
def train_vision(model, train: SceneBank, val: SceneBank, minutes: float, batch: int, lr: float, log, state,
                 max_steps: int | None = None):
    tower = model.model.vision_tower
    heads = _heads(state, "vision_heads", model.config.vision_config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(state.get("vision_steps", 0))
    t0, step = time.time(), 0
    tower.train()
    while time.time() - t0 < minutes * 60 and not _reached(state.get("vision_steps", 0) + step, max_steps):
        idx = torch.from_numpy(rng.choice(len(train), batch, replace=False))
        feats = tower_features(model, train.pixels[idx])
        loss, parts = heads.loss(feats, {k: v[idx] for k, v in train.labels.items()})
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"vision step {step} loss {loss.item():.3f} " + " ".join(f"{k} {v.item():.3f}" for k, v in parts.items()),
                stage="vision", step=step, loss=loss.item())
    state["vision_steps"] = state.get("vision_steps", 0) + step
    tower.eval()
    with torch.no_grad():
        feats = torch.cat([tower_features(model, val.pixels[i:i + 64]) for i in range(0, len(val), 64)])
    acc = heads.accuracy(feats, val.labels)
    log(f"vision val (foreground patches): {acc}", stage="vision", val=acc)
    return acc


# --- stage 2 ----------------------------------------------------------------------------------
class Conversations:
    """Token ids of multi-turn ShapesVQA conversations, the first turn exactly as tops-eval asks it."""

    def __init__(self, processor):
        self.tok = processor.tokenizer
        self.processor = processor
        self.eos = self.tok.eos_token_id
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        # the words a question turns on: the answer is asked of the last of them (see --word-aux)
        self.key_ids = set(self.tok.convert_tokens_to_ids(COLOURS + SHAPE_NAMES + ["objects"]))

    def first_turn(self, question: str) -> list[int]:
        prompt = f"{question}\n{SUFFIX['short']}"
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tok(self.processor.apply_chat_template(conv, add_generation_prompt=True))["input_ids"]

    def next_turn(self, question: str) -> list[int]:
        return self.tok(f"USER: {question}\n{SUFFIX['short']} ASSISTANT:", add_special_tokens=False)["input_ids"]

    def build(self, questions, order, word_aux: bool = False) -> tuple[list[int], list[tuple[int, int, str]]]:
        """(ids, targets): targets are (position predicting, token id, question type). With
        `word_aux`, the question's last key word (colour, shape, "objects") also predicts the answer,
        with type "aux:<type>": a one-hop retrieval from that word's own position, which the answer
        position then only has to copy."""
        ids, targets = [], []
        for n, j in enumerate(order):
            q = questions[j]
            start = len(ids)
            ids += self.first_turn(q.question) if n == 0 else self.next_turn(q.question)
            answer = self.tok(q.answer, add_special_tokens=False)["input_ids"]
            if word_aux:
                keys = [i for i in range(start, len(ids)) if ids[i] in self.key_ids]
                if keys:
                    targets.append((keys[-1], answer[0], "aux:" + q.qtype))
            for a in answer + [self.eos]:
                targets.append((len(ids) - 1, a, q.qtype))
                ids.append(a)
        return ids, targets


def lm_batch(model, convs: Conversations, feats: torch.Tensor, bank, idx, rng, turns: int, word_aux: bool = False):
    """A training batch of the scenes `idx` of `bank` (`feats`: its cached features): each scene's
    questions in a random order, up to `turns` of them. Returns (inputs_embeds, attention mask,
    targets, projected tokens, their patch labels) for lm_forward and the per-patch loss."""
    seqs = []
    for i in idx:
        qs = bank.questions[i]
        seqs.append(convs.build(qs, list(rng.permutation(len(qs)))[:turns], word_aux))
    images, projected, labels = visual_tokens(model, bank, feats, idx)
    return (*_batch_from(model, convs, images, seqs), projected, labels)


def visual_tokens(model, bank, feats: torch.Tensor, idx):
    """(each scene's visual-token sequence, the projected tokens [n, 576, width], their patch labels)
    for the scenes `idx` of `bank` from its cached, standardised tower features `feats`.

    LLaVA-1.5 (a SceneBank): the projector's 576 tokens are the sequence. LLaVA-NeXT (an AnyresBank):
    each scene's crops (base view first) through the projector, then HF's own
    `LlavaNextModel.pack_image_features` with the scene's image size and the model's `image_newline`:
    the base view's tokens, then the crops stitched, unpadded and with a newline after each row,
    which is what `get_image_features` builds from pixel values."""
    idx = [int(i) for i in idx]
    if not isinstance(bank, AnyresBank):
        projected = model.model.multi_modal_projector(feats[idx].float())
        return projected, projected, {k: v[idx] for k, v in bank.labels.items()}
    crops = [bank.crops(i) for i in idx]
    flat = torch.cat(crops)
    projected = model.model.multi_modal_projector(feats[flat].float())
    packed, _ = model.model.pack_image_features(
        torch.split(projected, [len(c) for c in crops]), torch.tensor([bank.image_sizes[i] for i in idx]),
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_newline=model.model.image_newline)
    return packed, projected, {k: v[flat] for k, v in bank.labels.items()}


def lm_forward(model, x, mask, where):
    rows, cols, ys, types = where
    hidden = model.model.language_model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[rows, cols])
    return logits, ys, types


def _reached(total_steps: int, max_steps: int | None) -> bool:
    """A stage stops at its time budget or once its running total reaches `max_steps` (not None)."""
    return max_steps is not None and total_steps >= max_steps


def combined_loss(logits, ys, types, word_aux: float, patch_aux, aux_weight: float):
    """(answer loss, total): the answers' cross-entropy, plus `word_aux` x that of the key-word targets
    (types "aux:..."), plus `aux_weight` x the per-patch loss on the projected tokens."""
    is_aux = torch.tensor([t.startswith("aux:") for t in types])
    per = nn.functional.cross_entropy(logits, ys, reduction="none")
    loss = per[~is_aux].mean()
    total = loss
    if word_aux and is_aux.any():
        total = total + word_aux * per[is_aux].mean()
    if aux_weight and patch_aux is not None:
        total = total + aux_weight * patch_aux
    return loss, total


def train_lm(model, processor, train: SceneBank, val: SceneBank, minutes: float, batch: int, lr: float, turns: int,
             aux_weight: float, log, state, eval_every: int = 100, word_aux: float = 0.0, checkpoint=None,
             checkpoint_minutes: float = 10.0, max_steps: int | None = None):
    convs = Conversations(processor)
    feats_train, feats_val = state["features"]["train"], state["features"]["val"]
    heads = _heads(state, "projector_heads", model.config.text_config.hidden_size)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if "lm_opt" in state:
        opt.load_state_dict(state["lm_opt"])
    rng = np.random.default_rng(1000 + state.get("lm_steps", 0))
    t0, step = time.time(), 0
    last_save = t0
    warmup = 50
    t_report, train_seconds = t0, 0.0  # the seconds of the steps since the last report (evaluations excluded)
    while time.time() - t0 < minutes * 60 and not _reached(state.get("lm_steps", 0) + step, max_steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (state.get("lm_steps", 0) + step + 1) / warmup)
        idx = rng.choice(len(train), batch, replace=False)
        x, mask, where, projected, labels = lm_batch(model, convs, feats_train, train, idx, rng, turns, word_aux > 0)
        logits, ys, types = lm_forward(model, x, mask, where)
        patch_aux = heads.loss(projected, labels)[0] if aux_weight else None
        loss, total = combined_loss(logits, ys, types, word_aux, patch_aux, aux_weight)
        opt.zero_grad()
        total.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        train_seconds += time.time() - t_report
        if step % 25 == 0:
            log(f"lm step {state.get('lm_steps', 0) + step} loss {loss.item():.3f} ({train_seconds / 25:.2f} s/step)",
                stage="lm", step=state.get("lm_steps", 0) + step, loss=loss.item(), step_seconds=train_seconds / 25)
            train_seconds = 0.0
        if step % eval_every == 0:
            evaluate_lm(model, processor, val, feats_val, log, state.get("lm_steps", 0) + step)
        t_report = time.time()
        if checkpoint is not None and time.time() - last_save > checkpoint_minutes * 60:
            state["lm_opt"] = opt.state_dict()
            checkpoint(extra_steps=step)
            last_save = time.time()
    state["lm_steps"] = state.get("lm_steps", 0) + step
    state["lm_opt"] = opt.state_dict()
    return evaluate_lm(model, processor, val, feats_val, log, state["lm_steps"])


@torch.no_grad()
def evaluate_lm(model, processor, bank, feats, log, step: int) -> dict:
    """Per-type accuracy of the first answer token, single-turn (as tops-eval asks), teacher-forced."""
    convs = Conversations(processor)
    rng = np.random.default_rng(7)
    hits: dict[str, list[bool]] = {}
    batch = 8 if isinstance(bank, AnyresBank) else 32  # anyres sequences are 2-3x as long
    for start in range(0, len(bank), batch):
        idx = np.arange(start, min(start + batch, len(bank)))
        for j in range(max(len(q) for q in bank.questions)):
            sel = [i for i in idx if j < len(bank.questions[i])]
            if not sel:
                continue
            seqs = []
            for i in sel:
                ids, tg = convs.build(bank.questions[i], [j])
                seqs.append((ids, tg[:1]))
            x, mask, where = _batch_from(model, convs, visual_tokens(model, bank, feats, sel)[0], seqs)
            logits, ys, types = lm_forward(model, x, mask, where)
            for t, ok in zip(types, (logits.argmax(-1) == ys).tolist()):
                hits.setdefault(t, []).append(ok)
    # ShapesVQA's types, then ShapesVQA-dense's ("dense/..."), then ShapesVQA-wide's, each in the order asked
    rank = {prefix: n for n, (_, prefix) in enumerate(TASKS.values())}
    acc = {t: round(float(np.mean(hits[t])), 4) for t in sorted(hits, key=lambda t: rank[t[:t.find("/") + 1]])}
    log(f"lm val step {step}: " + " ".join(f"{t} {a:.3f}" for t, a in acc.items()), stage="lm", step=step, val=acc)
    return acc


def _batch_from(model, convs, images, seqs):
    """(inputs_embeds, attention mask, targets) of token sequences `seqs` whose <image> token is
    replaced by the rows of `images[r]` (one [tokens, width] sequence per row, of any lengths), the
    rows right-padded; targets as lm_forward takes them, their positions moved past the image."""
    lm_embed = model.model.language_model.get_input_embeddings()
    length = max(len(s) + len(image) - 1 for (s, _), image in zip(seqs, images))
    x = torch.zeros(len(seqs), length, lm_embed.embedding_dim)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    rows, cols, ys, types = [], [], [], []
    for r, ((ids, tg), image) in enumerate(zip(seqs, images)):
        n_img = len(image)
        slot = ids.index(convs.image_id)
        text = lm_embed(torch.tensor(ids[:slot] + ids[slot + 1:]))
        seq = torch.cat([text[:slot], image, text[slot:]])
        x[r, : len(seq)] = seq
        mask[r, : len(seq)] = 1
        for pos, y, t in tg:
            rows.append(r)
            cols.append(pos + (n_img - 1 if pos > slot else 0))
            ys.append(y)
            types.append(t)
    return x, mask, (torch.tensor(rows), torch.tensor(cols), torch.tensor(ys), types)


@torch.no_grad()
def standardise_and_cache(model, banks: dict, log, stats=None) -> dict:
    """Run the frozen tower once per scene (per anyres crop for an AnyresBank); standardise its
    features per channel (mean/std over the train split, or the given `stats`). Returns features
    (fp16, [scenes or crops, 576, width]) per split and the (mean, std) used."""
    feats = {}
    for name, bank in banks.items():
        t = time.time()
        feats[name] = torch.cat([tower_features(model, pixels).half() for pixels in bank.pixel_batches(64)])
        log(f"{name}: tower features of {len(feats[name])} {'crops' if isinstance(bank, AnyresBank) else 'scenes'} "
            f"cached in {time.time() - t:.0f}s")
    if stats is None and isinstance(banks["train"], AnyresBank):
        stats = _chunked_stats(feats["train"])  # 3 crops a scene: a float32 copy of them all would not fit
    elif stats is None:
        flat = feats["train"].float().flatten(0, 1)
        stats = flat.mean(0), flat.std(0).clamp(min=1e-4)
    mean, std = stats
    for name in feats:  # in place, in chunks (the same values as all at once)
        for start in range(0, len(feats[name]), 256):
            chunk = feats[name][start:start + 256]
            chunk.copy_(((chunk.float() - mean) / std).half())
    return {"features": feats, "mean": mean, "std": std}


def _chunked_stats(feats: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of [n, tokens, width] fp16 features, summed in float64
    chunk by chunk; std clamped at 1e-4 as standardise_and_cache's."""
    total = torch.zeros(feats.shape[-1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(feats), chunk):
        x = feats[start:start + chunk].double().flatten(0, 1)
        total += x.sum(0)
        squares += (x * x).sum(0)
    n = feats.shape[0] * feats.shape[1]
    mean = total / n
    var = (squares - n * mean * mean) / max(n - 1, 1)
    return mean.float(), var.clamp(min=0).sqrt().float().clamp(min=1e-4)


def fold_standardisation(model, mean: torch.Tensor, std: torch.Tensor) -> None:
    """projector(standardise(f)) == projector'(f): fold (f - mean) / std into the first Linear."""
    first = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        w = first.weight / std  # [out, in] / [in]
        first.bias -= (w * mean).sum(1)
        first.weight.copy_(w)


# --- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory: the HF model, checkpoint.pt and log.jsonl")
    p.add_argument("--resume", default=None, help="a checkpoint.pt to continue from (its stage-1 tower is kept)")
    p.add_argument("--vision-from", default=None, metavar="CKPT",
                   help="take only the stage-1 tower (and its feature scaling) from a checkpoint.pt, skip stage 1, and "
                        "train a new projector and Llama (e.g. another --text-layers)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from a trained HF-format model (e.g. tops_edge/assets/shapes-llava): its tower frozen, "
                        "stage 1 skipped, its projector and Llama trained on (--text-* are then ignored)")
    p.add_argument("--grow-layers", type=int, default=0, metavar="N",
                   help="with --init-from: insert N Llama decoder layers that start as the identity "
                        "(2 + 6 -> 8 layers)")
    p.add_argument("--next", action="store_true",
                   help="with --init-from: convert its LLaVA-1.5 model to LLaVA-NeXT (anyres, pinpoints 336x336, 672x336 "
                        "and 336x672) and train that on anyres sequences (default tasks: shapesvqa-wide)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated: shapesvqa, shapesvqa-dense, shapesvqa-wide (default: shapesvqa, with --next "
                        "shapesvqa-wide, or a resumed run's tasks); shapesvqa-wide needs a LLaVA-NeXT model")
    p.add_argument("--train-scenes", type=int, default=6000, help="train scenes of each task")
    p.add_argument("--val-scenes", type=int, default=300, help="val scenes of each task")
    p.add_argument("--vision-minutes", type=float, default=15.0)
    p.add_argument("--tune-tower", type=float, default=0.0, metavar="MINUTES",
                   help="with --init-from: go on training the inherited vision tower (stage 1, fresh patch heads) "
                        "on this run's tasks for MINUTES before stage 2 (default 0: the tower stays as it is)")
    p.add_argument("--lm-minutes", type=float, default=60.0)
    p.add_argument("--vision-steps", type=int, default=None,
                   help="stop stage 1 once it has run this many steps in all (reproduces a run exactly; the time limit still applies)")
    p.add_argument("--lm-steps", type=int, default=None,
                   help="stop stage 2 once the run's total (resumed steps included) reaches this many steps")
    p.add_argument("--vision-batch", type=int, default=32)
    p.add_argument("--lm-batch", type=int, default=16)
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--lm-lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=200,
                   help="stage-2 steps between validation passes (--smoke: 10); each pass runs every val scene's questions")
    p.add_argument("--turns", type=int, default=6, help="questions per image in one training conversation")
    p.add_argument("--aux-weight", type=float, default=0.1, help="weight of the per-patch loss on projected tokens")
    p.add_argument("--word-aux", type=float, default=0.5,
                   help="weight of the answer predicted at the question's last key word (0: off)")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on a few scenes: machinery only")
    args = p.parse_args(argv)
    import shlex

    if args.init_from and (args.resume or args.vision_from):
        p.error("--init-from starts a new run: it does not go with --resume or --vision-from")
    if args.grow_layers and not args.init_from:
        p.error("--grow-layers grows the model of --init-from")
    if args.tune_tower and not args.init_from:
        p.error("--tune-tower tunes the tower of --init-from")
    if args.tune_tower < 0:
        p.error("--tune-tower must be 0 or more minutes")
    if args.grow_layers < 0:
        p.error("--grow-layers must be 0 or more")
    if args.eval_every < 1:
        p.error("--eval-every must be 1 or more")
    if args.init_from and not (Path(args.init_from) / "config.json").is_file():
        p.error(f"--init-from {args.init_from}: not an HF-format model directory (no config.json)")
    if args.next and not args.init_from:
        p.error("--next converts the trained LLaVA-1.5 model of --init-from DIR to LLaVA-NeXT (a resumed NeXT run "
                "needs no --next)")
    if args.next and args.tune_tower:
        p.error("--tune-tower trains the tower on 336px scenes with LLaVA-1.5's patch labels; it does not go with --next")
    task_list = parse_tasks(args.tasks) if args.tasks else ()
    if "shapesvqa-wide" in task_list and not (args.next or args.resume or args.init_from):
        p.error("shapesvqa-wide's 672x336 and 336x672 scenes need a LLaVA-NeXT model: add --next --init-from DIR")
    command = "python scripts/train_shapes_llava.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.train_scenes, args.val_scenes = 16, 8
        args.vision_minutes = args.lm_minutes = 0.02
        args.vision_batch, args.lm_batch = 4, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.jsonl", "a")

    def log(msg, **fields):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
        if fields:
            logf.write(json.dumps({"time": time.time(), **fields}) + "\n")
            logf.flush()

    ckpt = torch.load(args.resume, weights_only=False) if args.resume else None
    tasks = task_list or (tuple(ckpt["state"].get("tasks", ("shapesvqa",))) if ckpt
                          else ("shapesvqa-wide",) if args.next else ("shapesvqa",))
    state: dict = {}
    if ckpt is not None and "config" in ckpt["state"]:  # the checkpoint's own architecture and vocabulary
        model, processor = model_from(ckpt["state"]["config"], ckpt["state"]["vocab"], args.seed,
                                      ckpt["state"].get("image_processor"))
    elif args.init_from:
        model, processor, state = init_from(args.init_from, tasks, args.grow_layers, log, args.seed, to_anyres=args.next)
    else:
        model, processor = build_model(args.seed, 4, args.text_layers, args.text_width, args.heads, tasks)
    anyres = is_next(model)
    if "shapesvqa-wide" in tasks and not anyres:
        p.error("shapesvqa-wide's 672x336 and 336x672 scenes need a LLaVA-NeXT model: start from a LLaVA-1.5 one "
                "with --next --init-from DIR")
    if anyres and args.tune_tower:
        p.error("--tune-tower trains the tower on 336px scenes with LLaVA-1.5's patch labels; this model is LLaVA-NeXT")
    missing = sorted(set(vocabulary(tasks)) - set(tokens_of(processor.tokenizer)))
    if missing:
        raise SystemExit(f"train_shapes_llava: the model's vocabulary lacks words of {', '.join(tasks)} "
                         f"({' '.join(missing)}); start from it with --init-from to extend it")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        state = ckpt["state"]
        log(f"resumed from {args.resume}: {state.get('vision_steps', 0)} vision, {state.get('lm_steps', 0)} lm steps")
        if "history" not in state:  # checkpoints from before the history was kept: take it from TRAINING.json
            info = Path(args.resume).parent / "model" / "TRAINING.json"
            if info.exists():
                old = json.loads(info.read_text())
                state["history"] = [{k: old[k] for k in ("command", "vision_steps", "lm_steps")}]
    if args.vision_from:
        ckpt = torch.load(args.vision_from, weights_only=False)
        tower = {k: v for k, v in ckpt["model"].items() if k.startswith("model.vision_tower.")}
        missing = model.load_state_dict(tower, strict=False)
        assert not [k for k in missing.missing_keys if k.startswith("model.vision_tower.")], "tower shapes differ"
        state = {k: ckpt["state"][k] for k in ("vision_steps", "vision_heads", "mean", "std") if k in ckpt["state"]}
        log(f"tower from {args.vision_from} ({state.get('vision_steps', 0)} vision steps); new projector and Llama")
    state["tasks"] = list(tasks)
    state["config"], state["vocab"] = model.config.to_dict(), tokens_of(processor.tokenizer)
    bank = AnyresBank if anyres else SceneBank
    train = bank(processor, "train", args.train_scenes, log, tasks)
    val = bank(processor, "val", args.val_scenes, log, tasks)

    tower_given = args.vision_from or "parent" in state  # a tower trained elsewhere stays as it is
    if args.vision_minutes > 0 and not state.get("lm_steps") and not tower_given and not anyres:
        train_vision(model, train, val, args.vision_minutes, args.vision_batch, args.vision_lr, log, state,
                     max_steps=args.vision_steps)
    elif args.tune_tower > 0:  # the inherited tower, trained on (e.g. the dense) scenes it has not seen
        minutes = 0.02 if args.smoke else args.tune_tower
        train_vision(model, train, val, minutes, args.vision_batch, args.vision_lr, log, state,
                     max_steps=args.vision_steps)
        state.setdefault("parent", {})["tower_tuned_minutes"] = args.tune_tower
    for prm in model.model.vision_tower.parameters():
        prm.requires_grad_(False)
    model.model.vision_tower.eval()
    stats = (state["mean"], state["std"]) if "mean" in state else None  # a resumed run keeps its scaling
    state.update(standardise_and_cache(model, {"train": train, "val": val}, log, stats))
    if state.pop("unfold_projector", False):  # an --init-from projector expects raw features: unfold once
        unfold_standardisation(model, state["mean"], state["std"])
    if state.pop("init_newline", False):  # a model just converted to NeXT: its newline from the data
        newline = init_newline(model, train, state["features"]["train"])
        log(f"image_newline set to the mean projected background token (norm {float(newline.norm()):.3f})",
            stage="init", newline_norm=float(newline.norm()))
    train.pixels = val.pixels = None  # the frozen tower's features replace them: GBs freed
    def checkpoint(extra_steps: int = 0):
        """checkpoint.pt (to resume) and the HF model, both replaced atomically."""
        saved = {k: v for k, v in state.items() if k != "features"}
        saved["lm_steps"] = state.get("lm_steps", 0) + extra_steps
        # every command of a resumed chain, each with the step totals it ended at: together they reproduce it
        saved["history"] = list(state.get("history", [])) + [
            {"command": command, "vision_steps": saved.get("vision_steps", 0), "lm_steps": saved["lm_steps"]}]
        torch.save({"model": model.state_dict(), "state": saved}, out / "checkpoint.pt.tmp")
        os.replace(out / "checkpoint.pt.tmp", out / "checkpoint.pt")
        save_hf(model, processor, saved, out / "model", args, command)
        log(f"checkpoint: {saved.get('vision_steps', 0)} vision, {saved['lm_steps']} lm steps -> {out}")

    if args.lm_minutes > 0:
        train_lm(model, processor, train, val, args.lm_minutes, args.lm_batch, args.lm_lr, args.turns,
                 args.aux_weight, log, state, eval_every=10 if args.smoke else args.eval_every, word_aux=args.word_aux,
                 checkpoint=checkpoint, max_steps=args.lm_steps)
    checkpoint()
    return 0


def save_hf(model, processor, state, directory: Path, args, command: str) -> None:
    """The standardisation folded into the projector; weights, config and processor in HF format,
    written beside `directory` and swapped in."""
    import copy
    import shutil

    final = copy.deepcopy(model)
    fold_standardisation(final, state["mean"], state["std"])
    stage = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    final.save_pretrained(stage)
    processor.save_pretrained(stage)
    (stage / "TRAINING.json").write_text(json.dumps({
        "command": command, "vision_steps": state.get("vision_steps", 0), "lm_steps": state.get("lm_steps", 0),
        "history": state.get("history", []), **{k: state[k] for k in ("tasks", "parent") if k in state},
        "args": vars(args),
    }, indent=2) + "\n")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(stage, directory)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
