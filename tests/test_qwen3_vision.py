"""Qwen3-VL's vision tower re-implemented for export (tops_edge.models.qwen3_vision) against HF:
the numpy index arrays against transformers.vision_utils (and the position-table resampling against
F.interpolate itself), the torch module and one exported ONNX graph (dynamic in the patch count)
against get_image_features (pooler output and DeepStack features), the cls_attention substitute,
and the tiny model's generate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tops_edge.runtime.mrope3 import vision_index_arrays_qwen3

MERGE = 2
GRIDS = [(2, 2), (4, 4), (8, 12), (14, 14), (12, 28), (28, 10), (32, 32), (2, 30), (48, 48), (64, 34), (6, 100)]
TABLES = [64, 2304]  # the tiny model's 8 x 8 position table, the real models' 48 x 48
INPUTS = ("patch_positions", "interp_indices", "interp_weights")
#: (width, height) of the test images: square, wide, tall, and the processor's max pixels
SIZES = {"square": (224, 224), "wide": (448, 192), "tall": (160, 448), "max": (512, 512)}


def _hf_arrays(grid, table):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    thw = torch.tensor([[1, *grid]])
    indices, weights = get_vision_interpolation_indices_and_weights(
        thw, num_grid_per_side=int(table ** 0.5), mode="bilinear", align_corners=True, spatial_merge_size=MERGE)
    return get_vision_position_ids(thw, MERGE).numpy(), indices.numpy(), weights.numpy()


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("grid", GRIDS)
def test_index_arrays_match_hf(grid, table):
    arrays = vision_index_arrays_qwen3(*grid, MERGE, table)
    positions, indices, weights = _hf_arrays(grid, table)
    p = grid[0] * grid[1]
    assert arrays["patch_positions"].shape == (p, 2) and arrays["patch_positions"].dtype == np.int64
    assert arrays["interp_indices"].shape == (p, 4) and arrays["interp_indices"].dtype == np.int64
    assert arrays["interp_weights"].shape == (p, 4) and arrays["interp_weights"].dtype == np.float32
    np.testing.assert_array_equal(arrays["patch_positions"], positions)
    np.testing.assert_array_equal(arrays["interp_indices"], indices)
    np.testing.assert_array_equal(arrays["interp_weights"], weights)  # bit for bit: the same float32 ops
    np.testing.assert_allclose(arrays["interp_weights"].sum(1), 1.0, atol=1e-6)
    assert arrays["interp_indices"].min() >= 0 and arrays["interp_indices"].max() < table


@pytest.mark.parametrize("grid", [(4, 4), (12, 28), (28, 10), (6, 100), (64, 34)])
def test_interpolation_is_bilinear_align_corners(grid):
    """The gather-and-weight equals F.interpolate of the table (the mechanism HF's arrays encode),
    read in the processor's block-major patch order."""
    import torch.nn.functional as F

    side, dim = 8, 5
    table = torch.randn(side * side, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    arrays = vision_index_arrays_qwen3(*grid, MERGE, side * side)
    idx, w = torch.from_numpy(arrays["interp_indices"]), torch.from_numpy(arrays["interp_weights"]).double()
    ours = (table[idx] * w[..., None]).sum(1)  # [P, dim]
    grid_table = table.T.reshape(1, dim, side, side)
    ref = F.interpolate(grid_table, size=grid, mode="bilinear", align_corners=True)[0]  # [dim, h, w]
    rows, cols = arrays["patch_positions"].T
    # the weights are float32 (as HF's): their source coordinate is good to ~1e-7 of the table side
    np.testing.assert_allclose(ours.numpy(), ref[:, rows, cols].T.numpy(), atol=1e-5)


def test_index_arrays_reject_bad_grids():
    with pytest.raises(ValueError):
        vision_index_arrays_qwen3(5, 8, MERGE, 64)
    with pytest.raises(ValueError):
        vision_index_arrays_qwen3(8, 8, MERGE, 60)  # not a square table


# --- the module -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen3():
    from tops_edge.models.tiny_qwen3 import build_tiny_qwen3

    return build_tiny_qwen3()


@pytest.fixture(scope="module")
def vision(tiny_qwen3):
    from tops_edge.models.qwen3_vision import Qwen3Vision

    return Qwen3Vision(tiny_qwen3[0].model.visual, patch_attention=True).eval()


@pytest.fixture(scope="module")
def cases(tiny_qwen3):
    """name -> dict(pixels, thw, HF pooler_output, deepstack, last_hidden_state, the last block's
    input and rotary)."""
    from conftest import make_image

    model, processor = tiny_qwen3
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
            out[name] = dict(pixels=pixels, thw=thw, pooled=hf.pooler_output[0],
                             deepstack=torch.stack([f[0] for f in hf.deepstack_features]),
                             last_hidden=hf.last_hidden_state, h=captured["h"], rotary=captured["rotary"])
    finally:
        handle.remove()
    return out


def _inputs(vision, case):
    thw = case["thw"]
    return vision.inputs_for(case["pixels"], int(thw[0, 1]), int(thw[0, 2]))


def test_tiny_config_is_qwen3_shaped(tiny_qwen3):
    model, processor = tiny_qwen3
    vc, tc = model.config.vision_config, model.config.text_config
    assert vc.patch_size == 16 and vc.spatial_merge_size == 2 and vc.temporal_patch_size == 2
    assert processor.image_processor.patch_size == 16 and processor.image_processor.merge_size == 2
    assert list(vc.deepstack_visual_indexes) == [0, 1, 2] and len(model.model.visual.deepstack_merger_list) == 3
    assert model.model.visual.num_grid_per_side ** 2 == vc.num_position_embeddings
    assert sum(tc.rope_parameters["mrope_section"]) == tc.head_dim // 2
    assert tc.num_hidden_layers >= len(vc.deepstack_visual_indexes)


def test_tiny_cases_cover_shapes(cases):
    grids = {name: tuple(c["thw"][0, 1:].tolist()) for name, c in cases.items()}
    assert grids["square"][0] == grids["square"][1] and grids["max"] == (32, 32)
    assert grids["wide"][1] > grids["wide"][0] and grids["tall"][0] > grids["tall"][1]
    side = 8  # the table is resampled both ways: grids larger and smaller than it on some side
    assert all(max(g) > side for g in grids.values()) and any(min(g) <= 2 * side for g in grids.values())


@pytest.mark.parametrize("name", list(SIZES))
def test_torch_matches_hf(vision, cases, name):
    case = cases[name]
    with torch.no_grad():
        image, features, deepstack, cls = vision(*_inputs(vision, case))
    pooled, n = case["pooled"], case["pooled"].shape[0]
    assert image.shape == (1, n, 64) and features.shape == (1, n, 4 * 32) and cls.shape == (1, n)
    assert deepstack.shape == (3, n, 64)
    torch.testing.assert_close(image[0], pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(deepstack, case["deepstack"], atol=1e-5, rtol=0)
    with torch.no_grad():  # vision_features: the merger's input (its norm of HF's last hidden state)
        ref = vision.visual.merger.norm(case["last_hidden"]).reshape(n, -1)
    torch.testing.assert_close(features[0], ref, atol=1e-5, rtol=0)


def test_position_embedding_matters(vision, cases):
    """Wrong interpolation weights must break parity: the learned-table resampling is tested."""
    case = cases["wide"]
    pixels, positions, indices, weights = _inputs(vision, case)
    with torch.no_grad():
        image = vision(pixels, positions, indices, torch.full_like(weights, 0.25))[0]
    assert (image[0] - case["pooled"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(SIZES))
def test_cls_attention(vision, cases, name):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    case = cases[name]
    h, (cos, sin) = case["h"], case["rotary"]
    with torch.no_grad():
        _, _, _, cls = vision(*_inputs(vision, case))
        # reference from HF's own last block on HF's own input to it
        blk = vision.visual.blocks[-1]
        attn = blk.attn
        qkv = attn.qkv(blk.norm1(h)).reshape(h.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
        scores = torch.einsum("phd,qhd->hpq", q, k) * attn.scaling
        ref = scores.softmax(-1).mean(dim=(0, 1)).reshape(-1, 4).sum(-1)
    assert cls.shape == (1, ref.shape[0]) and bool((cls >= 0).all())
    torch.testing.assert_close(cls.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(cls[0], ref, atol=1e-6, rtol=1e-4)


def test_cls_attention_leaves_outputs_unchanged(vision, cases):
    from tops_edge.models.qwen3_vision import Qwen3Vision

    inputs = _inputs(vision, cases["tall"])
    with torch.no_grad():
        plain = Qwen3Vision(vision.visual)(*inputs)
        probed = vision(*inputs)
    assert len(plain) == 3 and len(probed) == 4
    for a, b in zip(plain, probed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- ONNX: one graph for every grid -------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_session(tiny_qwen3, tmp_path_factory):
    import onnxruntime as ort

    from tops_edge.export.onnx_export import export_part
    from tops_edge.models.qwen3_vl import Qwen3VLAdapter

    # the adapter's own vision part (its IO specs, traced from its example grid), on this module's model
    part = Qwen3VLAdapter(*tiny_qwen3, source="test").parts(cls_attention=True)[0]
    path = tmp_path_factory.mktemp("qwen3-vision") / "vision.onnx"
    files = export_part(part, path, opset=18)
    assert files == ["vision.onnx"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_onnx_graph_is_dynamic(onnx_session):
    shapes = {i.name: i.shape for i in onnx_session.get_inputs()}
    assert list(shapes) == ["pixel_values", *INPUTS]
    assert all(s[0] == "num_patches" for s in shapes.values())
    outputs = {o.name: o.shape for o in onnx_session.get_outputs()}
    assert list(outputs) == ["image_features", "vision_features", "deepstack_features", "cls_attention"]
    assert outputs["image_features"][1] == "num_tokens" and outputs["deepstack_features"] == [3, "num_tokens", 64]


@pytest.mark.parametrize("name", list(SIZES))
def test_onnx_matches_hf_on_other_grids(vision, cases, onnx_session, name):
    case = cases[name]
    thw = case["thw"]
    assert int(thw[0, 1]) * int(thw[0, 2]) != 8 * 12  # not the traced grid
    inputs = _inputs(vision, case)
    feeds = {spec.name: t.numpy() for spec, t in zip(onnx_session.get_inputs(), inputs)}
    image, features, deepstack, cls = onnx_session.run(None, feeds)
    np.testing.assert_allclose(image[0], case["pooled"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(deepstack, case["deepstack"].numpy(), atol=1e-4, rtol=0)
    with torch.no_grad():
        _, t_features, _, t_cls = vision(*inputs)
    np.testing.assert_allclose(features, t_features.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(cls, t_cls.numpy(), atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(cls.sum(), 1.0, atol=1e-5)


# --- the tiny model end to end ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt(tiny_qwen3):
    from conftest import make_image

    _, processor = tiny_qwen3
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[make_image(300, 200, 1)], return_tensors="pt")


def test_prompt_format(tiny_qwen3, prompt):
    _, processor = tiny_qwen3
    tok = processor.tokenizer
    text = tok.decode(prompt["input_ids"][0])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")  # no default system turn
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    t, h, w = prompt["image_grid_thw"][0].tolist()
    image = prompt["input_ids"][0] == processor.image_token_id
    assert int(image.sum()) == t * h * w // 4
    torch.testing.assert_close(prompt["mm_token_type_ids"][0], image.long())
    assert prompt["pixel_values"].shape == (t * h * w, 3 * 2 * 16 * 16)


def test_generate_smoke(tiny_qwen3, prompt):
    model, _ = tiny_qwen3
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    n = prompt["input_ids"].shape[1]
    assert out.shape[0] == 1 and n < out.shape[1] <= n + 8
    torch.testing.assert_close(out[:, :n], prompt["input_ids"])


def test_deepstack_is_added_after_the_first_decoder_layers(tiny_qwen3, prompt):
    """What HF's Qwen3-VL text model does with the DeepStack features (documented in
    qwen3_vision.py): row k is added to the output of decoder layer k at the image positions only."""
    model, processor = tiny_qwen3
    layers = model.model.language_model.layers
    outputs, inputs = {}, {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))
    try:
        with torch.no_grad():
            model(**prompt)
            ds = model.model.get_image_features(prompt["pixel_values"], prompt["image_grid_thw"]).deepstack_features
    finally:
        for hook in hooks:
            hook.remove()
    image = prompt["input_ids"][0] == processor.image_token_id
    for i in range(len(layers) - 1):
        delta = inputs[i + 1][0] - outputs[i][0]
        if i < len(ds):
            torch.testing.assert_close(delta[image], ds[i][0], atol=1e-6, rtol=0)
        else:
            assert float(delta[image].abs().max()) == 0
        assert float(delta[~image].abs().max()) == 0
