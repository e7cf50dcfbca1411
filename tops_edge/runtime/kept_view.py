"""Pictures of what a selector kept (`tops-run --show-kept`, `tops-eval --gallery`).

A panel is the image as the vision tower saw it (the processor's resized, cropped pixels, with the
normalisation undone), cut into its patches: a kept patch keeps its pixels and gets an outline in
its own colour; a dropped patch is dimmed. Where token merging put the dropped tokens into kept
tokens' groups, a second panel tints each dropped patch with its kept token's colour, so each
tinted region is what one kept token stands for. Patches the language model never receives
(LLaVA-NeXT's padding, removed by unpadding) are dark.

A stage is one row: its panels side by side. `single` layouts (LLaVA-1.5) draw one view per
panel; `anyres` (LLaVA-NeXT) two: the base view and the crops stitched back into the
high-resolution view.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

SCALE = 2  # panels are drawn at twice the tower's resolution, so a 14-px patch outline is visible
CAPTION = 18  # pixels of caption strip above a panel (at SCALE)
DIM = 0.45  # a dropped patch keeps this share of its brightness, over a grey
TINT = 0.4  # and this share of its group's colour
UNSEEN = (24, 24, 24)


@dataclass(frozen=True)
class Stage:
    """One pruning stage to draw: its caption, the kept sequence positions and each sequence
    token's kept slot (`GenerationResult.token_groups`: -1 = dropped outright)."""

    label: str
    kept: tuple[int, ...]
    groups: tuple[int, ...]

    @classmethod
    def of(cls, result, label: str | None = None) -> "Stage":
        """What the first decoder layer sees (the pruning before the LLM, merged groups included)."""
        n = result.num_visual_tokens
        text = label if label is not None else f"kept {len(result.kept_indices)} of {n} visual tokens"
        groups = result.token_groups or [-1] * n
        return cls(text, tuple(result.kept_indices), tuple(groups))

    @classmethod
    def all_of(cls, result) -> list["Stage"]:
        """One Stage per pruning stage that ran (`result.stages`): before the LLM with its merged
        groups, then each decoder cut (selection only); just `of` when nothing was pruned."""
        out = []
        for stage in result.stages:
            if stage["layer"] == 0:
                out.append(cls.of(result, f"before the LLM: kept {stage['keep']} of {result.num_visual_tokens}"))
                continue
            slot = {t: i for i, t in enumerate(stage["kept_indices"])}
            groups = tuple(slot.get(t, -1) for t in range(result.num_visual_tokens))
            out.append(cls(f"at layer {stage['layer']}: kept {stage['keep']}", tuple(stage["kept_indices"]), groups))
        return out or [cls.of(result)]


def slot_colours(count: int) -> np.ndarray:
    """[count, 3] uint8 colours, neighbouring slots far apart in hue (golden-ratio steps)."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues], dtype=np.uint8)


def model_views(pipe, image) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The vision graph's input crops as HxWx3 uint8 images, and the image's (height, width) (for
    `mrope`: the one resized image the patches come from, and its patch grid)."""
    pixels, size = pipe.pre.image_inputs(image)
    ip = pipe.pre.image_processor
    mean = np.asarray(ip.image_mean if getattr(ip, "do_normalize", True) else 0.0, np.float32).reshape(-1, 1, 1)
    std = np.asarray(ip.image_std if getattr(ip, "do_normalize", True) else 1.0, np.float32).reshape(-1, 1, 1)
    scale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
    if pipe.layout.name == "mrope":
        pixels = _unpatchify(pixels, size, pipe.layout.merge, pipe.layout.patch_size, len(mean))[None]
    crops = [np.clip((p * std + mean) / scale, 0, 255).round().astype(np.uint8).transpose(1, 2, 0) for p in pixels]
    return crops, size


def _unpatchify(patches: np.ndarray, grid, merge: int, patch: int, channels: int) -> np.ndarray:
    """Qwen-VL's [P, C*T*p*p] patches (merge-block-major, as its image processor lays them out) back
    to the [C, H*p, W*p] resized image (the first of the T identical frames)."""
    h, w = (int(v) for v in grid)
    x = patches.reshape(h // merge, w // merge, merge, merge, channels, -1, patch, patch)[:, :, :, :, :, 0]
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * patch, w * patch)


def _patch_side(pipe) -> int:
    n = pipe.layout.tokens_per_crop
    side = int(round(n ** 0.5))
    if side * side != n:
        raise InputError(f"this model's {n} visual tokens per crop do not lie on a square patch grid; "
                         "there is no picture of what was kept")
    return side


def panels(pipe, image, stage: Stage) -> list[tuple[str, np.ndarray]]:
    """(caption, RGB array) panels of one stage: one for `single`, base + high-res view for `anyres`."""
    crops, size = model_views(pipe, image)
    token_map = pipe.layout.token_map(size)
    if len(stage.groups) != len(token_map):
        raise InputError(f"the stage has {len(stage.groups)} token groups for an image of {len(token_map)} visual tokens")
    if pipe.layout.name == "mrope":  # one image, its token grid (rows x cols of 28 px) as the processor resized it
        rows, cols = token_map.grids[0]
        kept = np.zeros(len(token_map), dtype=bool)
        kept[list(stage.kept)] = True
        slot_of = np.asarray(stage.groups, dtype=np.int64)
        colours = slot_colours(max(len(stage.kept), 1))
        position = np.arange(rows * cols).reshape(rows, cols)
        merged = ((slot_of >= 0) & ~kept).any()
        return [(stage.label + suffix, _draw(crops[0], position, kept, slot_of, colours, tint))
                for suffix, tint in [("", False)] + ([(", merged groups", True)] if merged else [])]
    side, n = _patch_side(pipe), pipe.layout.tokens_per_crop
    # per crop and patch: its position in the visual sequence, or -1 (not in it: padding or newline)
    position = np.full(len(crops) * n, -1, dtype=np.int64)
    patches = token_map.source >= 0
    position[token_map.source[patches]] = np.flatnonzero(patches)
    position = position.reshape(len(crops), side, side)
    kept = np.zeros(len(token_map), dtype=bool)
    kept[list(stage.kept)] = True
    slot_of = np.asarray(stage.groups, dtype=np.int64)
    colours = slot_colours(max(len(stage.kept), 1))
    kinds = [("", False)]
    if ((slot_of >= 0) & ~kept).any():  # token merging grouped the dropped tokens: a second panel shows the groups
        kinds.append((", merged groups", True))
    out = []
    for suffix, tint in kinds:
        drawn = [_draw(crop, position[c], kept, slot_of, colours, tint) for c, crop in enumerate(crops)]
        if pipe.layout.name == "single":
            out.append((stage.label + suffix, drawn[0]))
            continue
        rows, cols = pipe.layout.crop_grid(size)
        high = np.concatenate([np.concatenate(drawn[1 + r * cols: 1 + (r + 1) * cols], axis=1) for r in range(rows)], 0)
        out += [(f"{stage.label}{suffix}: base view", drawn[0]), (f"{stage.label}{suffix}: {rows}x{cols} crops", high)]
    return out


def _draw(crop: np.ndarray, position: np.ndarray, kept: np.ndarray, slot_of: np.ndarray,
          colours: np.ndarray, tint: bool) -> np.ndarray:
    rows, cols = position.shape
    ph, pw = crop.shape[0] // rows, crop.shape[1] // cols
    img = np.repeat(np.repeat(crop.astype(np.float32), SCALE, 0), SCALE, 1)
    ph, pw = ph * SCALE, pw * SCALE
    for r in range(rows):
        for c in range(cols):
            t = position[r, c]
            block = img[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
            if t < 0:
                block[:] = UNSEEN
            elif not kept[t]:
                dim = DIM * block + (1 - DIM) * 128.0
                slot = slot_of[t] if tint else -1
                block[:] = dim if slot < 0 else (1 - TINT) * dim + TINT * colours[slot]
    for r in range(rows):  # outlines last, so a neighbour's tint never covers them
        for c in range(cols):
            t = position[r, c]
            if t >= 0 and kept[t]:
                colour = colours[slot_of[t]] if slot_of[t] >= 0 else (255, 255, 255)
                y0, x0, w = r * ph, c * pw, SCALE  # one tower pixel wide
                img[y0:y0 + ph, x0:x0 + w] = img[y0:y0 + ph, x0 + pw - w:x0 + pw] = colour
                img[y0:y0 + w, x0:x0 + pw] = img[y0 + ph - w:y0 + ph, x0:x0 + pw] = colour
    return img.round().astype(np.uint8)


def compose(rows: list[list[tuple[str, np.ndarray]]], title: str | None = None) -> "Image.Image":  # noqa: F821
    """Panels laid out in rows, each under its caption; an optional title line on top."""
    from PIL import Image, ImageDraw

    widths = [sum(p.shape[1] for _, p in row) + 8 * (len(row) - 1) for row in rows]
    heights = [max(p.shape[0] for _, p in row) + CAPTION for row in rows]
    top = CAPTION if title else 0
    canvas = Image.new("RGB", (max(widths), top + sum(heights) + 8 * (len(rows) - 1)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 3), title, fill=(0, 0, 0))
    y = top
    for row, height in zip(rows, heights):
        x = 0
        for caption, panel in row:
            draw.text((x + 2, y + 3), caption, fill=(0, 0, 0))
            canvas.paste(Image.fromarray(panel), (x, y + CAPTION))
            x += panel.shape[1] + 8
        y += height + 8
    return canvas


def save_png(picture, path) -> Path:
    """Write a PIL image as PNG, atomically (a temporary name, then a rename)."""
    import io

    from ..bench.report import write_atomic

    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return write_atomic(path, buf.getvalue())


def show_kept(pipe, image, stages: list[Stage], path, title: str | None = None) -> Path:
    """The picture of `stages` (one row of panels per stage) for IMAGE, written to PATH."""
    return save_png(compose([panels(pipe, image, s) for s in stages], title), path)


__all__ = ["Stage", "compose", "model_views", "panels", "save_png", "show_kept", "slot_colours"]
