"""Weight-only INT4 (`--precision int4-wo`, calib/int4.py): blocked DequantizeLinear against a numpy
reference, INT4 packing, AWQ against round to nearest, the export end to end, and the planner's figures."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tops_edge.calib.int4 import (AWQ_ALPHAS, BLOCK_SIZE, INT4_OPSET, activation_statistics, awq_scale,
                                  dequantize_blocked, int4_tensor, output_error, pack_int4, quantize_blocked,
                                  search_alpha, to_int4_weight_only, unpack_int4)
from tops_edge.cli import export_main
from tops_edge.errors import InputError
from tops_edge.export import export_model
from tops_edge.export.manifest import load_manifest
from tops_edge.models.architecture import load_architecture
from tops_edge.plan import PRESETS, footprint_of, plan_memory
from tops_edge.runtime import Pipeline
from cli_helpers import one_line_error
from conftest import PROMPTS

# LLaVA-1.5-7B's parameter counts (tests/test_plan.py derives them from the config)
VISION = 23 * (4 * 1024**2 + 2 * 1024 * 4096) + (1024 * 4096 + 4096**2) + 602_112 + 1_024 + 577 * 1024 + 2_048 \
    + 23 * 13_312 + 8_192
EMBED = 32064 * 4096
DECODER_MATMUL = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32064 * 4096
DECODER_OTHER = 32 * 2 * 4096 + 4096
GIB = 2**30


def dq_model(q: np.ndarray, scale: np.ndarray, axis: int, matmul_k: int | None = None) -> onnx.ModelProto:
    """DequantizeLinear(int4 q, scale, axis, block_size=128), optionally followed by x @ W."""
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=axis, block_size=BLOCK_SIZE)]
    inputs, outputs = [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(q.shape))]
    if matmul_k is not None:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, matmul_k])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, q.shape[1]])]
    graph = helper.make_graph(nodes, "dq", inputs, outputs, [int4_tensor("q", q), numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", INT4_OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, feeds=None, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds or {})[0]


# --- numerics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis", [((256, 48), 0), ((48, 256), 1)])
def test_blocked_dequantize_linear_equals_the_numpy_reference_exactly(shape, axis):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    q, scale = quantize_blocked(w, axis)
    assert scale.shape[axis] == 2 and q.min() >= -8 and q.max() <= 7
    ref = dequantize_blocked(q, scale, axis)
    assert np.array_equal(run(dq_model(q, scale, axis)), ref)
    # the reference by hand: element (i, j) is q x the scale of its block along the input channels
    i, j = (200, 7) if axis == 0 else (7, 200)
    blk = (i // BLOCK_SIZE, j) if axis == 0 else (i, j // BLOCK_SIZE)
    assert ref[i, j] == np.float32(q[i, j]) * scale[blk]
    assert np.abs(ref - w).max() <= np.abs(w).max() / 7 / 2 * 1.0001  # half a step of the largest block


@pytest.mark.parametrize("k", [200, 64, 129])
def test_a_partial_last_block_runs_in_ort_and_equals_the_reference(k):
    """K not a multiple of 128: ceil(K / 128) blocks, the last one short (nothing padded)."""
    rng = np.random.default_rng(k)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    w[BLOCK_SIZE:] *= 10  # the partial block's scale must be its own, not the first block's
    q, scale = quantize_blocked(w, 0)
    assert scale.shape == (-(-k // BLOCK_SIZE), 24)
    ref = dequantize_blocked(q, scale, 0)
    assert np.array_equal(run(dq_model(q, scale, 0)), ref)
    if k > BLOCK_SIZE:
        np.testing.assert_allclose(scale[-1], np.abs(w[BLOCK_SIZE:]).max(axis=0) / 7, rtol=1e-6)
    x = rng.standard_normal((5, k)).astype(np.float32)  # and through MatMul, unfused
    np.testing.assert_allclose(run(dq_model(q, scale, 0, matmul_k=k), {"x": x}), x @ ref, rtol=1e-5, atol=1e-5)


def test_int4_packing_round_trips_and_matches_onnx_reading_of_it():
    q = np.random.default_rng(1).integers(-8, 8, size=(7, 5)).astype(np.int8)  # odd count: a half-filled last byte
    raw = pack_int4(q)
    assert len(raw) == 18
    assert np.array_equal(unpack_int4(raw, q.shape), q)
    assert np.array_equal(numpy_helper.to_array(int4_tensor("q", q)).astype(np.int8), q)
    assert pack_int4(np.array([1, -1], np.int8)) == bytes([0xF1])  # first value in the low nibble
    with pytest.raises(ValueError, match="outside"):
        pack_int4(np.array([8], np.int8))


def test_awq_is_never_worse_than_rtn_and_wins_with_outlier_channels():
    """The search includes alpha = 0 (s = 1: RTN), so its error on the activations it searched is at
    most RTN's; with a few large input channels (the case AWQ is for) it is well below."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    x[:, :4] *= 30  # outlier channels
    weights = [rng.standard_normal((256, 64)).astype(np.float32) * 0.05 for _ in range(2)]
    absmean = np.abs(x).mean(axis=0)
    alpha, s, errors = search_alpha(x, absmean, weights)
    assert 0.0 in errors and set(errors) == set(map(float, AWQ_ALPHAS))
    rtn = output_error(x, weights, np.ones(256, np.float32))
    assert errors[0.0] == rtn and errors[alpha] <= rtn
    assert alpha > 0 and errors[alpha] < 0.8 * rtn
    np.testing.assert_allclose(np.exp(np.log(s).mean()), 1.0, rtol=1e-5)
    assert np.array_equal(awq_scale(absmean, 0.0), np.ones(256, np.float32))


def test_awq_search_on_a_tiny_decoder_graph_beats_rtn_per_group(tmp_path):
    """On a two-layer graph (norm Mul -> q/k, then o): the alpha picked for each group has an error no
    larger than alpha = 0's, the foldable group's scale goes into the Mul's constant (no new Mul), the
    other gets one Mul, and the written graph computes what the pass intended."""
    rng = np.random.default_rng(3)
    k = 160  # one full and one partial block
    gamma = (rng.random(k) + 0.5).astype(np.float32)
    wq, wk, wo = (rng.standard_normal((k, k)).astype(np.float32) * 0.1 for _ in range(3))
    nodes = [helper.make_node("Mul", ["h", "gamma"], ["normed"]),
             helper.make_node("MatMul", ["normed", "wq"], ["q"]), helper.make_node("MatMul", ["normed", "wk"], ["kk"]),
             helper.make_node("Add", ["q", "kk"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "wo"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "n", k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "n", k])],
                              [numpy_helper.from_array(a, n) for a, n in ((gamma, "gamma"), (wq, "wq"), (wk, "wk"), (wo, "wo"))])
    src, dst = tmp_path / "g.onnx", tmp_path / "g4.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    h = rng.standard_normal((1, 64, k)).astype(np.float32)
    h[..., :3] *= 20
    feeds = [{"h": h}, {"h": rng.standard_normal((1, 32, k)).astype(np.float32)}]
    report = {}
    to_int4_weight_only(src, dst, "awq", lambda: feeds, report)
    assert set(report) == {"normed", "r"}
    for group in report.values():
        assert group["errors"][group["alpha"]] <= group["errors"][0.0]
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    assert next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) == INT4_OPSET
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("DequantizeLinear") == 3 and ops.count("Mul") == 1 + (report["r"]["alpha"] > 0)
    assert {t.data_type for t in out.graph.initializer if t.name.endswith("_int4")} == {TensorProto.INT4}
    # the graph equals the pass's numbers: x / s, dequantized diag(s) W
    stats = activation_statistics(onnx.load(str(src)), ["normed"], feeds)
    s = awq_scale(stats["normed"][0], report["normed"]["alpha"])
    folded = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "gamma"))
    np.testing.assert_allclose(folded, gamma / s, rtol=1e-6)
    # ORT runs the written graph as its numpy dequantization, and the first group's output error
    # (q + k, read through the folded norm) is the one the search reported for its alpha
    y4 = run(out, {"h": h})
    np.testing.assert_allclose(y4, run(dequantized_float_graph(out), {"h": h}), rtol=1e-5, atol=1e-5 * np.abs(y4).max())
    x = np.concatenate([f["h"].reshape(-1, k) * gamma for f in feeds])
    np.testing.assert_allclose(output_error(x, [wq, wk], s), report["normed"]["errors"][report["normed"]["alpha"]], rtol=1e-4)


def test_awq_reads_a_graph_with_external_data_from_its_file(tmp_path):
    """A 7B decoder's graph is above protobuf's 2 GB limit, so the AWQ statistics run the graph's
    file (its weights in external data), not an in-memory copy: the same statistics and the same
    written weights as from a graph with its weights inside."""
    rng = np.random.default_rng(5)
    k = 160
    gamma = (rng.random(k) + 0.5).astype(np.float32)
    w = rng.standard_normal((k, k)).astype(np.float32) * 0.1
    nodes = [helper.make_node("Mul", ["h", "gamma"], ["normed"]), helper.make_node("MatMul", ["normed", "w"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "n", k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "n", k])],
                              [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    inside, outside = tmp_path / "in" / "g.onnx", tmp_path / "out" / "g.onnx"
    inside.parent.mkdir(), outside.parent.mkdir()
    onnx.save(model, str(inside))
    onnx.save_model(model, str(outside), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="g.onnx.data", size_threshold=0)
    assert not onnx.load(str(outside), load_external_data=False).graph.initializer[1].raw_data  # really outside
    feeds = [{"h": rng.standard_normal((1, 48, k)).astype(np.float32)}]
    a, b = activation_statistics(inside, ["normed"], feeds), activation_statistics(outside, ["normed"], feeds)
    np.testing.assert_array_equal(a["normed"][0], b["normed"][0])
    assert sorted(p.name for p in outside.parent.iterdir()) == ["g.onnx", "g.onnx.data"]  # the probe is gone
    to_int4_weight_only(inside, tmp_path / "a.onnx", "awq", lambda: feeds)
    to_int4_weight_only(outside, tmp_path / "b.onnx", "awq", lambda: feeds)
    wa, wb = ({t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f)).graph.initializer} for f in ("a.onnx", "b.onnx"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[n], wb[n]) for n in wa)


# --- export ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_calib():
    from tops_edge.calib import CalibrationSet
    from conftest import make_image

    images = tuple(make_image(336, 336, seed) for seed in range(2))
    return CalibrationSet("test-2", images, tuple(PROMPTS[:2]), "digest-test-2")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("int4")
    out = {"fp32": export_model(tiny, root / "fp32", selector="dpp-merge", keep=64, progress=False)}
    for method in ("awq", "rtn"):
        out[method] = export_model(tiny, root / method, selector="dpp-merge", keep=64, precision="int4-wo",
                                   int4_method=method, progress=False)
    return out


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_manifest_records_int4_wo_and_the_decoder_holds_blocked_int4(exports, method):
    manifest = load_manifest(exports[method], verify="full")
    assert manifest["precision"] == "int4-wo" and manifest["decoder"]["kv_dtype"] == "float32"
    assert {p: r["precision"] for p, r in manifest["parts"].items()} == {
        "vision": "fp32", "selector": "fp32", "embed": "fp32", "decoder": "int4-wo"}
    assert manifest["parts"]["decoder"]["int4"] == {"method": method, "block_size": BLOCK_SIZE}
    model = onnx.load(str(exports[method] / "decoder.onnx"))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    linears = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert dq and all(any(a.name == "block_size" and a.i == BLOCK_SIZE for a in n.attribute) for n in dq)
    assert not [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
                and any(t.name == n.input[1] for n in linears)]  # no float linear weight is left
    fp32 = (exports["fp32"] / "decoder.onnx").stat().st_size
    # (the tiny decoder's weights are 0.4 MB, so its graph structure counts: the awq graph is 0.30 of
    # the fp32 one since the attention reads its cache and the new rows apart, schema 7)
    assert (exports[method] / "decoder.onnx").stat().st_size < 0.31 * fp32


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_int4_wo_export_runs_in_the_ort_pipeline_close_to_fp32(exports, images, method):
    """Tolerance: 50% of the fp32 logits' range, on the random tiny-llava. INT4's step is max|w| / 7
    per block (int8-wo's: max|w| / 127 per channel, allowed 10% in test_calib); measured on this
    prompt: 33% (AWQ) and 36% (RTN) of the range, 25-36% over PROMPTS. Random weights amplify it
    (nearly one-hot attention, docs/precision.md); the trained model's figures are in the precision
    table. The exact check of the arithmetic is the next test."""
    def first_logits(directory):
        pipe = Pipeline.load(directory)
        seen = []
        step = pipe.decoder.step
        pipe.decoder.step = lambda e, p, *rest: seen.append(np.array(step(e, p, *rest))) or seen[-1]
        result = pipe.generate(images["wide"], PROMPTS[1], max_new_tokens=2)
        return seen[0], result

    (ref, ref_run), (got, run_) = first_logits(exports["fp32"]), first_logits(exports[method])
    assert len(run_.token_ids) == 2 and run_.keep == 64 and run_.kept_indices == ref_run.kept_indices
    assert 0 < np.abs(got - ref).max() <= 0.5 * np.abs(ref).max()


def dequantized_float_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The int4 graph with each DequantizeLinear replaced by its numpy reference's float weight."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    for node in dq:
        axis = next(a.i for a in node.attribute if a.name == "axis")
        w = dequantize_blocked(inits[node.input[0]].astype(np.int8), inits[node.input[1]], axis)
        out.graph.initializer.append(numpy_helper.from_array(w, node.output[0]))
    keep = [n for n in out.graph.node if n.op_type != "DequantizeLinear"]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_int4_decoder_computes_the_dequantized_float_graph(exports, method, small_calib):
    """On captured prefills, ORT (unfused, as TensorRT reads Q/DQ) gives the logits of the same graph
    with its weights dequantized in numpy: the int4 graph is exactly what the pass meant."""
    from tops_edge.calib.capture import capture

    manifest = load_manifest(exports[method])
    feeds = capture(exports[method], manifest, small_calib)["decoder"][:2]
    model = onnx.load(str(exports[method] / "decoder.onnx"))
    for feed in feeds:
        got = run(model, feed, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        ref = run(dequantized_float_graph(model), feed)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_int4_wo_with_cuts_converts_each_segment_and_awq_reads_each_segments_prefill(tmp_path, tiny):
    out = export_model(tiny, tmp_path / "cut", selector="dpp-merge", keep=64, precision="int4-wo", cuts=(1,),
                       progress=False)
    manifest = load_manifest(out)
    segments = [s["part"] for s in manifest["decoder"]["segments"]]
    assert segments == ["decoder.0", "decoder.1"]
    assert all(manifest["parts"][s]["precision"] == "int4-wo" for s in segments)
    assert len(Pipeline.load(out).generate(np.zeros((336, 336, 3), np.uint8), PROMPTS[0], max_new_tokens=2).token_ids) == 2


def test_int4_method_and_calib_are_checked_in_one_line(tmp_path, tiny):
    with pytest.raises(InputError, match="needs --precision int4-wo"):
        export_model(tiny, tmp_path / "a", precision="int8-wo", int4_method="rtn", progress=False)
    with pytest.raises(InputError, match="--int4-method gptq is not available.*awq, rtn"):
        export_model(tiny, tmp_path / "b", precision="int4-wo", int4_method="gptq", progress=False)
    with pytest.raises(InputError, match="--calib"):
        export_model(tiny, tmp_path / "c", precision="int4-wo", int4_method="rtn", calib=tmp_path, progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_cli_int4_method_reaches_the_manifest_and_a_bad_one_is_one_line(tmp_path, capsys):
    code = export_main(["--model", "tiny-llava", "--out", str(tmp_path / "rtn"), "--selector", "uniform", "--keep", "64",
                        "--precision", "int4-wo", "--int4-method", "rtn", "--quiet"])
    assert code == 0
    assert load_manifest(tmp_path / "rtn")["parts"]["decoder"]["int4"]["method"] == "rtn"
    capsys.readouterr()
    code = export_main(["--model", "tiny-llava", "--out", str(tmp_path / "x"), "--precision", "int4-wo",
                        "--int4-method", "gptq"])
    assert "invalid choice: 'gptq'" in one_line_error(capsys, code) and not (tmp_path / "x").exists()


# --- planner ------------------------------------------------------------------------------------
def test_planner_int4_wo_weights_by_hand():
    """Decoder linear weights: 4 bits + one fp32 scale per 128 input channels = 17/32 B each; the rest
    as int8-wo (fp16 on the device)."""
    fp = footprint_of(load_architecture("llava-v1.5-7b"))
    rows = {item: b for item, b, _ in plan_memory(fp, PRESETS["thor"], "int4-wo").rows}
    assert rows["weights: vision"] == 2 * VISION
    assert rows["weights: embed"] == 2 * EMBED
    assert Fraction(1, 2) + Fraction(4, 128) == Fraction(17, 32)
    assert rows["weights: decoder"] == DECODER_MATMUL * 17 // 32 + 2 * DECODER_OTHER == 3_510_681_600
    assert rows["KV cache"] == 2 * 32 * 32 * 128 * 2 * 4096


def test_dry_run_for_llava_7b_on_orin_nano_at_int4_wo(tmp_path, capsys):
    """The 7B at int4-wo on an 8 GB Orin Nano, by hand (GiB = 2^30 bytes):
       vision 2 x 311,888,896 = 0.581; embed 0.245; decoder 6,607,339,520 x 17 / 32 + 2 x 266,240
       = 3,510,681,600 = 3.270; KV cache at the preset's 2048 tokens, one fp16 buffer per tensor:
       1.000; activations 0.078; workspace 0.5; reserved 1.5 -> 7.173 GiB: it fits, 0.83 GiB spare
       (with the two ping-pong buffers of schema 6 it was 8.17, 0.17 GiB over)."""
    code = export_main(["--model", "llava-v1.5-7b", "--out", str(tmp_path / "o"), "--device", "orin-nano",
                        "--precision", "int4-wo", "--dry-run"])
    out = capsys.readouterr()
    assert "orin-nano" in out.out and "int4-wo, context 2048" in out.out
    assert "6607.3M matmul x 0.53125 B" in out.out
    total = 2 * VISION + 2 * EMBED + 3_510_681_600 + 2 * 32 * 32 * 128 * 2 * 2048 \
        + (576 + 512) * (4 * 4096 + 2 * 11008) * 2 + 32064 * 4 + GIB // 2 + 3 * GIB // 2
    assert f"total {total / GIB:>8.2f}".split() == ["total", "7.17"]
    assert f"fits ({(8 * GIB - total) / GIB:.2f} GiB spare)" in out.out
    assert code == 0 and out.err.strip() == ""
    assert not (tmp_path / "o").exists()


def test_dry_run_int4_wo_error_is_one_line(tmp_path, capsys):
    # the 7B fits the Orin Nano at int4-wo (above); the 13B does not
    one_line_error(capsys, export_main(["--model", "llava-v1.5-13b", "--out", str(tmp_path / "o"),
                                        "--device", "orin-nano", "--precision", "int4-wo", "--dry-run"]))
