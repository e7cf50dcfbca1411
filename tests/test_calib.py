"""Precision builds (calib/): fp16 with fp32 islands, INT8 with Q/DQ only on linear layers,
weight-only INT8, calibrated on real pairs captured from the fp32 pipeline, with a reused cache."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import onnx
import pytest

from tops_edge.calib import PART_PLAN, CalibrationSet, default_calibration_set, load_calibration_set
from tops_edge.calib import capture as capture_module
from tops_edge.calib.graphs import activation_matmuls, lm_head
from tops_edge.cli import bench_main, build_main, export_main, run_main
from tops_edge.export import export_model
from tops_edge.export.manifest import load_manifest
from tops_edge.runtime import Pipeline
from cli_helpers import EXAMPLE, one_line_error
from conftest import PROMPTS, make_image

FLOAT, FLOAT16, INT8 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8
#: what INT8 must leave in float: norms, softmax, residual/bias adds, the norm statistics chain
FLOAT_ONLY_OPS = ("LayerNormalization", "Softmax", "Add", "ReduceMean", "Pow", "Sqrt", "Div", "Mul", "Cos", "Sin")


@pytest.fixture(scope="module")
def small_calib():
    """Four real pairs: quick to calibrate on, still real images and prompts."""
    images = tuple(make_image(336, 336, seed) for seed in range(4))
    return CalibrationSet("test-4", images, tuple(PROMPTS[i % len(PROMPTS)] for i in range(4)), "digest-test-4")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny, small_calib):
    """tiny-llava with the tops selector (K=64) at every precision; the cache in a folder of its own."""
    root = tmp_path_factory.mktemp("precisions")
    mp = pytest.MonkeyPatch()
    mp.setenv("TOPS_EDGE_CACHE", str(root / "cache"))
    out = {p: export_model(tiny, root / p, selector="dpp-merge", keep=64, precision=p, progress=False,
                           calib=small_calib if p == "int8" else None)
           for p in ("fp32", "fp16", "int8", "int8-wo")}
    yield out
    mp.undo()


def graph(directory, part) -> onnx.ModelProto:
    return onnx.load(str(directory / f"{part}.onnx"))


def consumers(model):
    out = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def producers(model):
    return {o: node for node in model.graph.node for o in node.output}


def initializer_types(model) -> Counter:
    return Counter(t.data_type for t in model.graph.initializer)


def io_types(model) -> set[int]:
    return {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


# --- manifest ------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8-wo"])
def test_manifest_records_each_parts_precision(exports, precision):
    manifest = load_manifest(exports[precision], verify="full")
    assert manifest["precision"] == precision
    expected = {part: PART_PLAN[precision].get(part, "fp32") for part in manifest["parts"]}
    assert {part: rec["precision"] for part, rec in manifest["parts"].items()} == expected
    assert manifest["parts"]["selector"]["precision"] == "fp32"
    # the IO policy: fp32 IO at every precision, but an fp16 decoder's KV cache is fp16
    assert manifest["decoder"]["kv_dtype"] == ("float16" if precision == "fp16" else "float32")
    kv = {s["dtype"] for s in manifest["parts"]["decoder"]["inputs"] + manifest["parts"]["decoder"]["outputs"]
          if s["name"].startswith(("past_key_values.", "present."))}
    assert kv == {manifest["decoder"]["kv_dtype"]}


def test_manifest_without_a_parts_precision_fails_with_one_line(exports, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(exports["fp32"], tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["parts"]["decoder"]["precision"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(capsys, run_main([str(copy), "--image", str(EXAMPLE), "--prompt", "Hi"]))
    assert "part 'decoder' has no precision" in line


# --- fp16 ----------------------------------------------------------------------------------------
def test_fp16_graphs_hold_fp16_weights_behind_fp32_io_but_an_fp16_kv_cache(exports):
    for part in ("vision", "embed", "decoder"):
        model = graph(exports["fp16"], part)
        types = initializer_types(model)
        assert types[FLOAT16] > 0 and types[FLOAT16] >= types[FLOAT], part
        for value in [*model.graph.input, *model.graph.output]:
            kv = value.name.startswith(("past_key_values.", "present."))
            assert value.type.tensor_type.elem_type in ({FLOAT16} if kv else {FLOAT, onnx.TensorProto.INT64}), value.name
    assert initializer_types(graph(exports["fp16"], "selector"))[FLOAT16] == 0


def test_fp16_keeps_norms_softmax_and_rotary_in_fp32(exports):
    for part in ("vision", "decoder"):
        model = onnx.shape_inference.infer_shapes(graph(exports["fp16"], part))
        dtype = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
        checked = 0
        for node in model.graph.node:
            if node.op_type in ("Softmax", "LayerNormalization", "ReduceMean", "Sqrt", "Cos", "Sin"):
                assert dtype.get(node.input[0]) == FLOAT, (part, node.name)
                checked += 1
        assert checked, part
        assert any(dtype.get(n.input[0]) == FLOAT16 for n in model.graph.node if n.op_type == "MatMul"), part


def test_fp16_rotary_angles_never_round_trip_through_fp16(exports):
    """The converter puts fp32 -> fp16 -> fp32 casts between nodes it keeps fp32; for rotary angles
    (position x frequency, up to the context length) that cost ~0.1 in cos/sin."""
    model = graph(exports["fp16"], "decoder")
    made = producers(model)
    to = lambda node: next(a.i for a in node.attribute if a.name == "to")  # noqa: E731
    upstream = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    seen = set()
    while upstream:
        node = upstream.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        assert not (node.op_type == "Cast" and to(node) == FLOAT16), node.name
        upstream.extend(made[i] for i in node.input if i in made)
    assert len(seen) > 2


# --- int8 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["vision", "decoder"])
def test_int8_puts_qdq_on_linear_layers_only(exports, part):
    model = graph(exports["int8"], part)
    use, made = consumers(model), producers(model)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and dq and initializer_types(model)[INT8] > 0
    readers = {c.op_type for d in dq for c in use[d.output[0]]}
    assert readers <= {"MatMul", "Gemm", "Identity"}  # Identity: a weight shared by two linear layers
    assert not readers & set(FLOAT_ONLY_OPS)
    # a linear layer's output is never quantized: its bias/residual Add and the norms read float
    assert not {made[n.input[0]].op_type for n in q if n.input[0] in made} & {"MatMul", "Gemm", "Softmax", "Add"}
    weights_symmetric = [t for t in model.graph.initializer if t.name.endswith("zero_point")]
    assert weights_symmetric and all(not onnx.numpy_helper.to_array(t).any() for t in weights_symmetric)


def test_int8_leaves_attention_matmuls_and_lm_head_in_float(exports):
    fp32 = graph(exports["fp32"], "decoder")
    model = graph(exports["int8"], "decoder")
    made = producers(model)
    float_nodes = set(activation_matmuls(fp32)) | set(lm_head(fp32))
    assert len(lm_head(fp32)) == 1 and len(float_nodes) > 1
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name in float_nodes:
            assert all(made.get(i) is None or made[i].op_type != "DequantizeLinear" for i in node.input), node.name


@pytest.mark.parametrize("part", ["selector", "embed"])
def test_int8_leaves_selector_and_embed_without_qdq(exports, part):
    model = graph(exports["int8"], part)
    assert not [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert initializer_types(model)[INT8] == 0


# --- int8-wo -------------------------------------------------------------------------------------
def test_int8_weight_only_dequantizes_int8_weights_with_float_activations(exports):
    model = graph(exports["int8-wo"], "decoder")
    use = consumers(model)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in model.graph.initializer}
    assert dq and not [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[0]].data_type == INT8 for n in dq)  # every DQ reads a stored weight
    assert {c.op_type for d in dq for c in use[d.output[0]]} <= {"MatMul", "Gemm", "Identity"}
    assert len(dq) == len([n for n in graph(exports["fp32"], "decoder").graph.initializer
                           if n.name in {d.input[0].removesuffix("_quantized") for d in dq}])
    fp32_bytes = (exports["fp32"] / "decoder.onnx").stat().st_size
    assert (exports["int8-wo"] / "decoder.onnx").stat().st_size < 0.5 * fp32_bytes
    for part in ("vision", "selector", "embed"):
        assert not [n for n in graph(exports["int8-wo"], part).graph.node if n.op_type == "DequantizeLinear"]


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-wo"])
def test_every_precision_runs_end_to_end_close_to_fp32(exports, images, precision):
    ref = Pipeline.load(exports["fp32"]).generate(images["square"], PROMPTS[0], max_new_tokens=4)
    pipe = Pipeline.load(exports[precision])
    out = pipe.generate(images["square"], PROMPTS[0], max_new_tokens=4)
    assert len(out.token_ids) == 4 and out.keep == 64
    overlap = len(set(out.kept_indices) & set(ref.kept_indices)) / len(ref.kept_indices)
    # the selector stays fp32; int8 vision features move its picks a little
    assert overlap == 1.0 if precision != "int8" else overlap >= 0.5
    # the same tokens in the cache; fp16 holds them in half the bytes
    assert out.kv_cache_bytes == ref.kv_cache_bytes // (2 if precision == "fp16" else 1)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-wo"])
def test_prefill_logits_stay_close_to_fp32(exports, images, precision):
    def first_logits(directory):
        pipe = Pipeline.load(directory)
        seen = []
        step = pipe.decoder.step
        pipe.decoder.step = lambda e, p, *rest: seen.append(np.array(step(e, p, *rest))) or seen[-1]
        pipe.generate(images["wide"], PROMPTS[1], max_new_tokens=1)
        return seen[0]

    ref, got = first_logits(exports["fp32"]), first_logits(exports[precision])
    tolerance = {"fp16": 0.01, "int8-wo": 0.1, "int8": 0.5}[precision]
    assert np.abs(got - ref).max() <= tolerance * max(np.abs(ref).max(), 1.0)


def test_unfused_int8_computes_the_graphs_qdq_arithmetic(exports, images, monkeypatch):
    """With QDQ fusion off (the default on x86 without VNNI), ORT at full optimization gives the same
    prefill logits as ORT running Q/DQ as plain ops (basic optimizations only): the graph's own
    arithmetic, which TensorRT implements. The switch reaches the sessions' options."""
    import onnxruntime as ort

    from tops_edge.runtime.backend import OrtBackend

    def first_logits(backend):
        pipe = Pipeline.load(exports["int8"])
        pipe = Pipeline(pipe.directory, pipe.manifest, backend)
        seen = []
        step = pipe.decoder.step
        pipe.decoder.step = lambda e, p, *rest: seen.append(np.array(step(e, p, *rest))) or seen[-1]
        pipe.generate(images["wide"], PROMPTS[1], max_new_tokens=1)
        return seen[0]

    unfused = OrtBackend(qdq_fusion=False)
    assert unfused.options.get_session_config_entry("session.disable_quant_qdq") == "1"
    basic = OrtBackend(qdq_fusion=True)
    basic.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    np.testing.assert_allclose(first_logits(unfused), first_logits(basic), atol=1e-4)
    monkeypatch.setenv("TOPS_EDGE_QDQ_FUSION", "1")
    assert OrtBackend().qdq_fusion is True
    monkeypatch.setenv("TOPS_EDGE_QDQ_FUSION", "0")
    assert OrtBackend().qdq_fusion is False


def test_int8_export_runs_through_tops_run_and_tops_bench(exports, tmp_path, capsys):
    assert run_main([str(exports["int8"]), "--image", str(EXAMPLE), "--prompt", "What is here?",
                     "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    assert bench_main([str(exports["int8-wo"]), "--keep", "576,64", "--runs", "1", "--warmup", "0", "--new-tokens", "2",
                       "--json", str(tmp_path / "b.json"), "--quiet"]) == 0


def test_tiny_llava_next_int8_runs_end_to_end(tmp_path, monkeypatch, images, small_calib):
    monkeypatch.setenv("TOPS_EDGE_CACHE", str(tmp_path / "cache"))
    out = export_model("tiny-llava-next", tmp_path / "next-int8", selector="uniform", keep_ratio=0.25, precision="int8",
                       calib=small_calib, progress=False)
    result = Pipeline.load(out).generate(images["wide"], PROMPTS[0], max_new_tokens=3)
    assert len(result.token_ids) == 3 and result.num_visual_tokens > 576
    assert [n for n in graph(out, "vision").graph.node if n.op_type == "QuantizeLinear"]


def test_build_dry_run_plans_an_int8_wo_export_as_int8_wo(exports, capsys):
    assert build_main([str(exports["int8-wo"]), "--device", "orin-nx", "--precision", "int8", "--dry-run"]) == 0
    assert "(Jetson Orin NX 16 GB), int8-wo, context" in capsys.readouterr().out


def test_tops_export_int8_with_a_calib_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPS_EDGE_CACHE", str(tmp_path / "cache"))
    calib = _calib_dir(tmp_path, '{"prompt": "What shape is it?"}\n{"image": "a.png", "prompt": "Any red?"}\n')
    assert export_main(["--model", "tiny-llava", "--out", str(tmp_path / "out"), "--precision", "int8",
                        "--calib", str(calib), "--quiet"]) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["precision"] == "int8" and manifest["parts"]["decoder"]["precision"] == "int8"
    assert len(list((tmp_path / "cache" / "calib").glob("*.json"))) == 2


def test_build_refuses_fp16_engines_from_qdq_graphs_with_one_line(exports, capsys):
    line = one_line_error(capsys, build_main([str(exports["int8-wo"]), "--device", "orin-nano", "--precision", "fp16"]))
    assert "Q/DQ" in line and "--precision int8" in line


# --- calibration data ----------------------------------------------------------------------------
def test_decoder_calibration_sees_the_pruned_prefill(exports, small_calib):
    manifest = load_manifest(exports["fp32"])
    feeds = capture_module.capture(exports["fp32"], manifest, small_calib)
    pipe = Pipeline.load(exports["fp32"])
    assert len(feeds["vision"]) == len(feeds["decoder"]) == len(small_calib)
    for image, prompt, prefill in zip(small_calib.images, small_calib.prompts, feeds["decoder"]):
        result = pipe.generate(image, prompt, max_new_tokens=1)
        assert prefill["inputs_embeds"].shape[1] == result.prompt_tokens  # K=64 visual tokens, not 576
        assert result.prompt_tokens < 576
        assert prefill["past_key_values.0.key"].shape[2] == result.prompt_tokens  # an empty cache of its size
        assert prefill["cache_position"].tolist() == list(range(result.prompt_tokens))
    assert feeds["vision"][0]["pixel_values"].shape[-2:] == (336, 336)


def test_calibration_folder_pairs_prompts_with_images(tmp_path):
    make_image(64, 48, 1).save(tmp_path / "a.png")
    make_image(48, 64, 2).save(tmp_path / "b.jpg")
    (tmp_path / "prompts.jsonl").write_text('{"image": "b.jpg", "prompt": "What?"}\n\n{"prompt": "Why?"}\n{"prompt": "How?"}\n')
    calib = load_calibration_set(tmp_path)
    assert calib.prompts == ("What?", "Why?", "How?")
    assert [im.size for im in calib.images] == [(48, 64), (64, 48), (48, 64)]
    assert calib.digest == load_calibration_set(tmp_path).digest != default_calibration_set(2).digest


def test_default_calibration_set_uses_shapesvqa_train_scenes():
    calib = default_calibration_set(4)
    assert len(calib) == 4 and calib.name == "shapesvqa-train-4"
    assert all(im.size == (336, 336) for im in calib.images)


def test_calibration_cache_is_reused_and_keyed_by_data(tmp_path, monkeypatch, tiny, small_calib):
    monkeypatch.setenv("TOPS_EDGE_CACHE", str(tmp_path / "cache"))
    first = export_model(tiny, tmp_path / "a", selector="uniform", keep=64, precision="int8", calib=small_calib,
                         progress=False)
    entries = sorted(p.name for p in (tmp_path / "cache" / "calib").iterdir())
    assert [e.split("-")[0] for e in entries] == ["decoder", "vision"]

    def no_capture(*args, **kwargs):
        raise AssertionError("the fp32 pipeline ran although the cache holds the ranges")

    monkeypatch.setattr(capture_module, "capture", no_capture)
    second = export_model(tiny, tmp_path / "b", selector="uniform", keep=64, precision="int8", calib=small_calib,
                          progress=False)
    for part in ("vision", "decoder"):
        assert (first / f"{part}.onnx").read_bytes() == (second / f"{part}.onnx").read_bytes()
    other = CalibrationSet("other", small_calib.images[:2], small_calib.prompts[:2], "digest-other")
    with pytest.raises(AssertionError, match="cache holds"):  # other data: a miss, so it calibrates again
        export_model(tiny, tmp_path / "c", selector="uniform", keep=64, precision="int8", calib=other, progress=False)
    assert not (tmp_path / "c").exists()


def _calib_dir(tmp_path, prompts: str | None, image: bool = True):
    d = tmp_path / "calib"
    d.mkdir()
    if image:
        make_image(64, 64, 0).save(d / "a.png")
    if prompts is not None:
        (d / "prompts.jsonl").write_text(prompts)
    return d


@pytest.mark.parametrize("case, expect", [
    ("missing", "is not a directory"),
    ("no-prompts", "has no prompts.jsonl"),
    ("bad-json", "prompts.jsonl:2 is not JSON"),
    ("no-prompt-key", "prompts.jsonl:1 needs a non-empty \"prompt\""),
    ("missing-image", "does not exist"),
    ("not-an-image", "cannot be decoded"),
    ("no-images", "names no \"image\""),
    ("empty", "holds no prompts"),
    ("not-int8", "needs --precision int8"),
])
def test_bad_calib_fails_with_one_line_and_writes_nothing(tmp_path, capsys, case, expect):
    prompts = {"no-prompts": None, "bad-json": '{"prompt": "a"}\n{oops\n', "no-prompt-key": '{"image": "a.png"}\n',
               "missing-image": '{"image": "gone.png", "prompt": "a"}\n', "not-an-image": '{"image": "x.png", "prompt": "a"}\n',
               "no-images": '{"prompt": "a"}\n', "empty": "\n"}.get(case, '{"prompt": "a"}\n')
    calib = tmp_path / "nowhere" if case == "missing" else _calib_dir(tmp_path, prompts, image=case != "no-images")
    if case == "not-an-image":
        (calib / "x.png").write_text("not a png")
    out = tmp_path / "out"
    precision = "fp16" if case == "not-int8" else "int8"
    line = one_line_error(capsys, export_main(["--model", "tiny-llava", "--out", str(out), "--precision", precision,
                                               "--calib", str(calib), "--quiet"]))
    assert expect in line and ("--calib" in line or str(calib) in line), line
    assert not out.exists()


def test_trt_target_int8_calibrates_through_the_plugin_selectors_onnx_form(tmp_path, monkeypatch, tiny, small_calib):
    from tops_edge.plugins.onnx_form import plugin_nodes

    monkeypatch.setenv("TOPS_EDGE_CACHE", str(tmp_path / "cache"))
    out = export_model(tiny, tmp_path / "trt-int8", selector="dpp-merge", keep=64, target="trt", precision="int8",
                       calib=small_calib, progress=False)
    assert plugin_nodes(graph(out, "selector"))  # the deployed selector is still the TensorRT plugin
    assert [n for n in graph(out, "decoder").graph.node if n.op_type == "QuantizeLinear"]
    assert load_manifest(out)["parts"]["selector"]["precision"] == "fp32"
