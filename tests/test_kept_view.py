"""Pictures of what was kept (runtime/kept_view.py, `tops-run --show-kept`, `tops-eval --gallery`):
the panel is the image the tower saw, kept patches keep their pixels under an outline in their
colour, dropped ones are dimmed, merged groups are tinted with their kept token's colour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cli_helpers import EXAMPLE, one_line_error
from tops_edge.runtime import kept_view
from tops_edge.runtime.kept_view import Stage, model_views, panels

SIDE = 24  # tiny-llava: 336px / 14 = 24 x 24 patches


def _patch(panel: np.ndarray, t: int) -> np.ndarray:
    size = panel.shape[0] // SIDE
    r, c = divmod(t, SIDE)
    return panel[r * size:(r + 1) * size, c * size:(c + 1) * size].astype(np.float32)


def _inside(block: np.ndarray) -> np.ndarray:
    w = kept_view.SCALE
    return block[w:-w, w:-w]


@pytest.fixture(scope="module")
def run(pipe_uniform):
    pipe_uniform.merge = "mean"
    result = pipe_uniform.generate(EXAMPLE, "What is in the picture?", max_new_tokens=1, keep=64)
    view = model_views(pipe_uniform, EXAMPLE)[0][0]
    big = np.repeat(np.repeat(view, kept_view.SCALE, 0), kept_view.SCALE, 1)
    return result, big


def test_the_view_is_the_vision_graphs_input(pipe_uniform):
    """Normalising the view again gives the pixel values the vision graph ran on (up to the 1/255
    rounding of a uint8 image)."""
    views, _ = model_views(pipe_uniform, EXAMPLE)
    pixels = pipe_uniform.pre.pixel_values(EXAMPLE)[0]
    ip = pipe_uniform.pre.image_processor
    again = (views[0].transpose(2, 0, 1) * ip.rescale_factor - np.reshape(ip.image_mean, (3, 1, 1))) / \
        np.reshape(ip.image_std, (3, 1, 1))
    assert views[0].shape == (336, 336, 3) and views[0].dtype == np.uint8
    np.testing.assert_allclose(again, pixels, atol=0.6 / 255 / min(ip.image_std))


def test_token_groups_follow_the_merge(pipe_uniform, run):
    result, _ = run
    groups = np.asarray(result.token_groups)
    assert len(groups) == 576 and groups.min() >= 0
    np.testing.assert_array_equal(np.bincount(groups, minlength=64), result.kept_sizes)
    np.testing.assert_array_equal(groups[result.kept_indices], np.arange(64))
    pipe_uniform.merge = "none"
    try:
        plain = pipe_uniform.generate(EXAMPLE, "What is in the picture?", max_new_tokens=1, keep=64)
    finally:
        pipe_uniform.merge = "mean"
    groups = np.asarray(plain.token_groups)
    assert plain.kept_indices == result.kept_indices  # uniform: the same grid either way
    np.testing.assert_array_equal(groups[plain.kept_indices], np.arange(64))
    assert (np.delete(groups, plain.kept_indices) == -1).all()


def test_kept_patches_keep_their_pixels_and_dropped_patches_do_not(pipe_uniform, run):
    result, big = run
    (caption, kept_panel), (group_caption, _) = panels(pipe_uniform, EXAMPLE, Stage.of(result))
    assert caption == "kept 64 of 576 visual tokens" and "merged groups" in group_caption
    assert kept_panel.shape == big.shape
    colours = kept_view.slot_colours(64)
    kept = set(result.kept_indices)
    for slot, t in enumerate(result.kept_indices):
        block = _patch(kept_panel, t)
        np.testing.assert_array_equal(_inside(block), _inside(_patch(big, t)))
        assert (block[0] == colours[slot]).all() and (block[:, -1] == colours[slot]).all()  # the outline
    dropped = [t for t in range(576) if t not in kept]
    diffs = [np.abs(_patch(kept_panel, t) - _patch(big, t)).mean() for t in dropped]
    assert min(diffs) > 10, min(diffs)


def test_merged_groups_are_tinted_with_their_kept_tokens_colour(pipe_uniform, run):
    """In the groups panel a dropped patch is (1 - TINT) x its dimmed pixels + TINT x its kept
    token's colour; the kept-only panel carries no tint."""
    result, big = run
    (_, kept_panel), (_, group_panel) = panels(pipe_uniform, EXAMPLE, Stage.of(result))
    colours = kept_view.slot_colours(64).astype(np.float32)
    kept = set(result.kept_indices)
    for t in [t for t in range(576) if t not in kept][::37]:
        dim = kept_view.DIM * _patch(big, t) + (1 - kept_view.DIM) * 128.0
        np.testing.assert_allclose(_patch(kept_panel, t), dim, atol=0.51)
        expected = (1 - kept_view.TINT) * dim + kept_view.TINT * colours[result.token_groups[t]]
        np.testing.assert_allclose(_patch(group_panel, t), expected, atol=0.51)


def test_anyres_draws_the_base_view_and_the_stitched_crops(tmp_path):
    from tops_edge.export import export_model
    from tops_edge.runtime import Pipeline

    out = export_model("tiny-llava-next", tmp_path / "next", selector="uniform", keep=128, progress=False)
    pipe = Pipeline.load(out)
    wide = Image.open(EXAMPLE).convert("RGB").resize((700, 300))
    result = pipe.generate(wide, "What is in the picture?", max_new_tokens=1)
    drawn = panels(pipe, wide, Stage.of(result))
    rows, cols = pipe.layout.crop_grid((300, 700))
    assert [p.shape[:2] for _, p in drawn] == [(672, 672), (rows * 672, cols * 672)] * 2
    high = drawn[1][1]
    assert (high == kept_view.UNSEEN).all(axis=-1).any()  # the padding that unpadding removed is dark
    path = kept_view.show_kept(pipe, wide, [Stage.of(result)], tmp_path / "next.png", title="wide")
    assert Image.open(path).size[0] == sum(p.shape[1] for _, p in drawn) + 8 * 3  # one row: four panels


def test_tops_run_show_kept_writes_the_picture(tiny_uniform_dir, tmp_path, capsys):
    from tops_edge import cli

    path = tmp_path / "kept.png"
    assert cli.run_main([str(tiny_uniform_dir), "--image", str(EXAMPLE), "--prompt", "What is it?",
                         "--max-new-tokens", "2", "--keep", "36", "--show-kept", str(path), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.endswith("\n")
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1] == 2 * 672 + 8  # the kept panel and the merged-groups panel side by side


def test_tops_eval_gallery_puts_each_selector_side_by_side(tiny_uniform_dir, tmp_path, capsys):
    from tops_edge import cli

    gallery = tmp_path / "gallery"
    assert cli.eval_main([str(tiny_uniform_dir), "--limit", "3", "--keep", "64,16", "--selector", "uniform,random",
                          "--types", "count", "--max-new-tokens", "1", "--gallery", str(gallery),
                          "--gallery-items", "2", "--quiet"]) == 0
    files = sorted(p.name for p in gallery.iterdir())
    assert files == ["item000-k16.png", "item000-k64.png", "item001-k16.png", "item001-k64.png"]
    picture = np.asarray(Image.open(gallery / "item000-k16.png").convert("RGB"))
    assert picture.shape[1] == 2 * 672 + 8
    left, right = picture[-672:, :672], picture[-672:, 680:]
    assert np.abs(left.astype(int) - right).mean() > 1  # uniform and random kept different patches


def test_tops_eval_gallery_that_is_a_file_fails_in_one_line(tiny_uniform_dir, tmp_path, capsys):
    from tops_edge import cli

    file = tmp_path / "file.png"
    file.write_bytes(b"")
    code = cli.eval_main([str(tiny_uniform_dir), "--limit", "1", "--gallery", str(file)])
    assert "is a file" in one_line_error(capsys, code)
