"""Qwen2.5-VL's vision tower re-implemented for export (tops_edge.models.qwen_vision) against HF:
the numpy index arrays against transformers.vision_utils, the torch module and one exported ONNX
graph (dynamic in the patch count) against get_image_features, and the cls_attention substitute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tops_edge.runtime.mrope import vision_index_arrays

MERGE, WINDOW, PATCH = 2, 112, 14  # the tiny model's: 8 patches (4 merged tokens) a window side
GRIDS = [(4, 4), (8, 10), (10, 8), (16, 24), (14, 14), (32, 32), (2, 2), (2, 30), (18, 6)]
INPUTS = ("patch_positions", "window_index", "window_ids")
#: (width, height) of the test images: square, wide, tall, and the processor's max pixels
SIZES = {"square": (224, 224), "wide": (392, 196), "tall": (140, 420), "max": (448, 448)}


def _hf_indices(grid):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    thw = torch.tensor([[1, *grid]])
    positions = get_vision_position_ids(thw, MERGE)
    window_index, cu_window_seqlens = get_vision_window_index(thw, MERGE, WINDOW, PATCH)
    return positions.numpy(), window_index.numpy(), cu_window_seqlens.numpy()


@pytest.mark.parametrize("grid", GRIDS)
def test_index_arrays_match_hf(grid):
    arrays = vision_index_arrays(*grid, MERGE, WINDOW, PATCH)
    positions, window_index, _ = _hf_indices(grid)
    p, n = grid[0] * grid[1], grid[0] * grid[1] // MERGE ** 2
    assert arrays["patch_positions"].shape == (p, 2) and arrays["window_index"].shape == (n,)
    assert arrays["window_ids"].shape == (n,)
    assert all(a.dtype == np.int64 for a in arrays.values())
    np.testing.assert_array_equal(arrays["patch_positions"], positions)
    np.testing.assert_array_equal(arrays["window_index"], window_index)


@pytest.mark.parametrize("grid", GRIDS)
def test_window_ids_are_hf_window_segments(grid):
    ids = vision_index_arrays(*grid, MERGE, WINDOW, PATCH)["window_ids"]
    _, _, cu = _hf_indices(grid)
    # the runs of equal ids, in patches (merge^2 per token), are HF's cu_window_seqlens
    starts = np.flatnonzero(np.diff(ids)) + 1
    bounds = np.concatenate([[0], starts, [len(ids)]]) * MERGE ** 2
    np.testing.assert_array_equal(bounds, cu)
    # ids are 0, 1, ... in order, each window one contiguous run
    np.testing.assert_array_equal(np.unique(ids), np.arange(len(cu) - 1))
    assert np.all(np.diff(ids) >= 0)
    # per-patch membership: same window iff both patches lie in one cu segment
    patch_ids = np.repeat(ids, MERGE ** 2)
    segment = np.searchsorted(cu, np.arange(len(patch_ids)), side="right") - 1
    np.testing.assert_array_equal(patch_ids, segment)


def test_index_arrays_reject_bad_grids():
    with pytest.raises(ValueError):
        vision_index_arrays(5, 8, MERGE, WINDOW, PATCH)
    with pytest.raises(ValueError):
        vision_index_arrays(8, 8, MERGE, 14, PATCH)


# --- the module -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen():
    from tops_edge.models.tiny_qwen import build_tiny_qwen

    return build_tiny_qwen()


@pytest.fixture(scope="module")
def vision(tiny_qwen):
    from tops_edge.models.qwen_vision import QwenVision

    return QwenVision(tiny_qwen[0].model.visual, patch_attention=True).eval()


@pytest.fixture(scope="module")
def cases(tiny_qwen):
    """name -> (pixel_values, grid_thw, HF pooler_output, HF last_hidden_state, HF last block's inputs)."""
    from conftest import make_image

    model, processor = tiny_qwen
    visual = model.model.visual
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0]
        captured["rotary"] = kwargs["position_embeddings"]

    out = {}
    handle = visual.blocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for seed, (name, (width, height)) in enumerate(SIZES.items()):
            batch = processor.image_processor(images=[make_image(width, height, seed + 10)], return_tensors="np")
            pixels = torch.from_numpy(batch["pixel_values"]).float()
            thw = torch.from_numpy(batch["image_grid_thw"])
            with torch.no_grad():
                hf = model.model.get_image_features(pixels, thw)
            out[name] = (pixels, thw, hf.pooler_output[0], hf.last_hidden_state, captured["h"], captured["rotary"])
    finally:
        handle.remove()
    return out


def _inputs(vision, pixels, thw):
    arrays = vision.index_arrays(int(thw[0, 1]), int(thw[0, 2]))
    return (pixels, *(torch.from_numpy(arrays[k]) for k in INPUTS))


def test_tiny_cases_cover_windows_and_shapes(cases):
    grids = {name: tuple(c[1][0, 1:].tolist()) for name, c in cases.items()}
    assert grids["square"] == (16, 16) and grids["max"] == (32, 32)
    assert grids["wide"][1] > grids["wide"][0] and grids["tall"][0] > grids["tall"][1]
    # several windows and grids that do not divide into them: the window mask is exercised
    assert any(g[0] % 8 or g[1] % 8 for g in grids.values())
    assert all(g[0] * g[1] > 64 for g in grids.values())


@pytest.mark.parametrize("name", list(SIZES))
def test_torch_matches_hf(vision, cases, name):
    pixels, thw, pooled, last_hidden, _, _ = cases[name]
    with torch.no_grad():
        image, features, cls = vision(*_inputs(vision, pixels, thw))
    n = pooled.shape[0]
    assert image.shape == (1, n, pooled.shape[1]) and features.shape == (1, n, 4 * 32) and cls.shape == (1, n)
    torch.testing.assert_close(image[0], pooled, atol=1e-5, rtol=0)
    # vision_features: the merger's input (ln_q of HF's last hidden state), in HF's output order
    merger = vision.visual.merger
    window_index = torch.from_numpy(vision.index_arrays(int(thw[0, 1]), int(thw[0, 2]))["window_index"])
    with torch.no_grad():
        ref = merger.ln_q(last_hidden).reshape(n, -1)[torch.argsort(window_index)]
    torch.testing.assert_close(features[0], ref, atol=1e-5, rtol=0)


def test_window_mask_matters(vision, cases):
    """Treating every block as full attention must break parity: the windowed blocks are tested."""
    from tops_edge.models.qwen_vision import QwenVision

    pixels, thw, pooled, *_ = cases["square"]
    wrong = QwenVision(vision.visual)
    wrong.full_blocks = frozenset(range(len(vision.visual.blocks)))
    with torch.no_grad():
        image, _ = wrong(*_inputs(vision, pixels, thw))
    assert (image[0] - pooled).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(SIZES))
def test_cls_attention(vision, cases, name):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    pixels, thw, _, _, h, (cos, sin) = cases[name]
    assert len(vision.visual.blocks) - 1 in vision.full_blocks  # the tiny model's last block is full
    with torch.no_grad():
        _, _, cls = vision(*_inputs(vision, pixels, thw))
        # reference from HF's own last block on HF's own input to it (window order)
        blk = vision.visual.blocks[-1]
        attn = blk.attn
        qkv = attn.qkv(blk.norm1(h)).reshape(h.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
        scores = torch.einsum("phd,qhd->hpq", q, k) * attn.scaling
        received = scores.softmax(-1).mean(dim=(0, 1)).reshape(-1, 4).sum(-1)
    window_index = torch.from_numpy(vision.index_arrays(int(thw[0, 1]), int(thw[0, 2]))["window_index"])
    ref = received[torch.argsort(window_index)]
    assert cls.shape == (1, ref.shape[0])
    assert bool((cls >= 0).all())
    torch.testing.assert_close(cls.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(cls[0], ref, atol=1e-6, rtol=1e-4)


def test_cls_attention_of_a_windowed_last_block(vision, cases):
    """A tower whose last block is windowed: cls_attention uses that block's window mask. Reference:
    HF-style per-window softmax over the cu_window_seqlens segments, on the same block input."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    from tops_edge.models.qwen_vision import QwenVision

    visual = vision.visual
    windowed = QwenVision(visual, patch_attention=True)
    windowed.full_blocks = frozenset({1})  # block 3 (the last) windowed
    pixels, thw, *_ = cases["tall"]
    grid = (int(thw[0, 1]), int(thw[0, 2]))
    blk = visual.blocks[-1]
    captured = {}
    handle = blk.norm1.register_forward_pre_hook(lambda module, args: captured.setdefault("h", args[0]))
    try:
        with torch.no_grad():
            _, _, cls = windowed(*_inputs(vision, pixels, thw))
    finally:
        handle.remove()
    positions, window_index, cu = (torch.from_numpy(a) for a in _hf_indices(grid))
    h = captured["h"]
    with torch.no_grad():
        cos, sin = visual.rotary_pos_emb(h, positions)
        cos, sin = (visual.permute_input_for_window_attn(t, window_index, h.shape[0]) for t in (cos, sin))
        attn = blk.attn
        qkv = attn.qkv(blk.norm1(h)).reshape(h.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
        received = torch.zeros(h.shape[0])
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            scores = torch.einsum("phd,qhd->hpq", q[a:b], k[a:b]) * attn.scaling
            received[a:b] = scores.softmax(-1).sum(dim=(0, 1)) / (attn.num_heads * h.shape[0])
    ref = received.reshape(-1, 4).sum(-1)[torch.argsort(window_index)]
    assert len(cu) > 2 and bool((cls >= 0).all())
    torch.testing.assert_close(cls.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(cls[0], ref, atol=1e-6, rtol=1e-4)


def test_cls_attention_leaves_outputs_unchanged(vision, cases):
    from tops_edge.models.qwen_vision import QwenVision

    pixels, thw, *_ = cases["wide"]
    with torch.no_grad():
        plain = QwenVision(vision.visual)(*_inputs(vision, pixels, thw))
        probed = vision(*_inputs(vision, pixels, thw))
    assert len(plain) == 2 and len(probed) == 3
    for a, b in zip(plain, probed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- ONNX: one graph for every grid -------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_session(tiny_qwen, tmp_path_factory):
    import onnxruntime as ort

    from tops_edge.export.onnx_export import export_part
    from tops_edge.models.qwen2_5_vl import Qwen2_5_VLAdapter

    # the adapter's own vision part (its IO specs, traced from its example grid), on this module's model
    part = Qwen2_5_VLAdapter(*tiny_qwen, source="test").parts(cls_attention=True)[0]
    path = tmp_path_factory.mktemp("qwen-vision") / "vision.onnx"
    files = export_part(part, path, opset=18)
    assert files == ["vision.onnx"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_onnx_graph_is_dynamic(onnx_session):
    shapes = {i.name: i.shape for i in onnx_session.get_inputs()}
    assert shapes["pixel_values"][0] == "num_patches" and shapes["window_ids"] == ["num_tokens"]
    outputs = {o.name: o.shape for o in onnx_session.get_outputs()}
    assert list(outputs) == ["image_features", "vision_features", "cls_attention"]
    assert outputs["image_features"][1] == "num_tokens"


@pytest.mark.parametrize("name", list(SIZES))
def test_onnx_matches_hf_on_other_grids(vision, cases, onnx_session, name):
    pixels, thw, pooled, *_ = cases[name]
    assert int(thw[0, 1]) * int(thw[0, 2]) != 8 * 12  # not the traced grid
    inputs = _inputs(vision, pixels, thw)
    feeds = {spec.name: t.numpy() for spec, t in zip(onnx_session.get_inputs(), inputs)}
    image, features, cls = onnx_session.run(None, feeds)
    np.testing.assert_allclose(image[0], pooled.numpy(), atol=1e-4, rtol=0)
    with torch.no_grad():
        _, t_features, t_cls = vision(*inputs)
    np.testing.assert_allclose(features, t_features.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(cls, t_cls.numpy(), atol=1e-6, rtol=1e-4)
