"""The shape pass (tops_edge/export/shapes.py): the same outputs as the traced graph, fewer shape ops.

Each decoder graph is exported once with the pass off, then simplified in memory, and both run
side by side in ONNX Runtime on prefills into an empty cache and decode steps after a past, for
the plain Llama decoder, a decoder cut into segments and Qwen2.5-VL's and Qwen3-VL's (3-row M-RoPE
positions).
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tops_edge.export import shapes
from tops_edge.export.onnx_export import export_part, opset_default
from tops_edge.models import load

#: (batch, new tokens S, cache slots C, past slots bound P, filled slots before the step)
CASES = [
    (1, 7, 12, 0, 0),    # a prefill into an empty cache: the past bound as 0 slots
    (1, 1, 12, 12, 7),   # a decode step
    (1, 3, 20, 20, 9),   # a few tokens after a past (e.g. a chunk of the prompt)
    (1, 1, 40, 40, 39),  # the step that fills the cache
    (2, 2, 9, 9, 4),     # batch 2 (the graphs are batch-dynamic)
]


def feeds(model: onnx.ModelProto, batch, seq, capacity, past, filled, seed=0) -> dict:
    """Inputs for a step of `seq` tokens into slots filled..filled+seq of a `capacity`-slot cache."""
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "sequence": seq, "cache_sequence": capacity, "past_sequence": past}
    out = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param] for d in vi.type.tensor_type.shape.dim]
        name = vi.name
        if name == "attention_mask":
            out[name] = np.zeros(dims, np.int64)
            out[name][:, : filled + seq] = 1
        elif name == "attention_bias":
            out[name] = (0.1 * rng.standard_normal(dims)).astype(np.float32)
        elif name == "cache_position":
            out[name] = np.arange(filled, filled + seq, dtype=np.int64)
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(filled, filled + seq, dtype=np.int64), dims).copy()
        else:
            assert vi.type.tensor_type.elem_type == TensorProto.FLOAT, name
            out[name] = rng.standard_normal(dims).astype(np.float32)
    return out


def session(model: onnx.ModelProto, optimize: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimize:  # the graph as written (ORT's Reshape fusion writes -1 for one unknown entry itself)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, cases=CASES):
    a, b = session(before), session(after)
    for k, case in enumerate(cases):
        f = feeds(before, *case, seed=k)
        for name, x, y in zip([o.name for o in a.get_outputs()], a.run(None, f), b.run(None, f)):
            assert x.shape == y.shape, (case, name)
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-6, err_msg=f"{case} {name}")


def shape_reads(model: onnx.ModelProto) -> list[str]:
    """What the graph's Shape nodes read."""
    return [n.input[0] for n in model.graph.node if n.op_type == "Shape"]


def raw_parts(adapter, tmp_path, monkeypatch, **kw) -> dict[str, onnx.ModelProto]:
    """The adapter's decoder parts exported with the pass off: name -> model."""
    monkeypatch.setenv(shapes.ENV, "0")
    out = {}
    for part in adapter.parts(**kw):
        if part.name.startswith("decoder"):
            path = tmp_path / f"{part.name}.onnx"
            export_part(part, path, opset=opset_default())
            out[part.name] = onnx.load(str(path))
    return out


@pytest.fixture(scope="module")
def llava_decoder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return raw_parts(load("tiny-llava"), tmp_path_factory.mktemp("raw"), mp)["decoder"]


def simplified(model):
    new = copy.deepcopy(model)
    stats = shapes.simplify(new)
    onnx.checker.check_model(new)
    return new, stats


def test_the_llama_decoder_gives_the_same_outputs_with_far_fewer_shape_ops(llava_decoder):
    new, stats = simplified(llava_decoder)
    assert_same_outputs(llava_decoder, new)
    before, after = shapes.count_shape_ops(llava_decoder.graph), shapes.count_shape_ops(new.graph)
    assert after < 0.5 * before, stats
    assert len(new.graph.node) < 0.6 * len(llava_decoder.graph.node), stats
    # what is left reads dims once per graph, from its inputs: no layer computes a shape any more
    inputs = {i.name for i in new.graph.input}
    assert set(shape_reads(new)) <= inputs and len(shape_reads(new)) <= 2
    assert len(shape_reads(llava_decoder)) > 20
    # the q/k/v head splits are constants that copy batch and sequence: [0, 0, -1, head_dim]
    consts = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in new.graph.initializer}
    splits = [consts.get(n.input[1]) for n in new.graph.node if n.op_type == "Reshape" and "proj" in n.input[0]]
    assert splits.count([0, 0, -1, 16]) == 3 * 2  # q, k, v in each of the 2 layers


def test_the_weights_are_the_same_tensors(llava_decoder):
    new, _ = simplified(llava_decoder)
    old = {t.name: t.SerializeToString() for t in llava_decoder.graph.initializer}
    kept = {t.name: t.SerializeToString() for t in new.graph.initializer if t.name in old}
    assert kept == old  # nothing of the original is changed or dropped; only small int constants are added
    added = [t for t in new.graph.initializer if t.name not in old]
    assert all(t.data_type in (TensorProto.INT64, TensorProto.INT32) and len(t.dims) <= 1 for t in added)


def test_a_decoder_in_segments_gives_the_same_outputs(tmp_path, monkeypatch):
    parts = raw_parts(load("tiny-llava"), tmp_path, monkeypatch, cuts=(1,))
    assert sorted(parts) == ["decoder.0", "decoder.1"]
    for name, model in parts.items():
        new, stats = simplified(model)
        assert shapes.count_shape_ops(new.graph) < 0.6 * shapes.count_shape_ops(model.graph), (name, stats)
        assert_same_outputs(model, new)  # decoder.0's cut_attention over the cache slots included


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_qwen_vl_decoders_with_3_row_positions_give_the_same_outputs(tmp_path, monkeypatch, name):
    model = raw_parts(load(name), tmp_path, monkeypatch)["decoder"]  # Qwen3-VL: with its deepstack_embeds
    assert [d.dim_value for d in model.graph.input[2].type.tensor_type.shape.dim][:1] == [3]
    new, stats = simplified(model)
    assert shapes.count_shape_ops(new.graph) < 0.5 * shapes.count_shape_ops(model.graph), stats
    assert_same_outputs(model, new)


def test_the_switch_turns_the_pass_off_in_the_export(tmp_path, monkeypatch):
    decoder = next(p for p in load("tiny-llava").parts() if p.name == "decoder")
    monkeypatch.setenv(shapes.ENV, "0")
    assert not shapes.enabled() and not shapes.applies("decoder")
    export_part(decoder, tmp_path / "off.onnx", opset=opset_default())
    monkeypatch.delenv(shapes.ENV)
    monkeypatch.setattr(shapes, "ENABLED", True)
    assert shapes.applies("decoder") and shapes.applies("decoder.1") and not shapes.applies("vision")
    export_part(decoder, tmp_path / "on.onnx", opset=opset_default())
    monkeypatch.setattr(shapes, "ENABLED", False)
    assert not shapes.applies("decoder")
    monkeypatch.setenv(shapes.ENV, "1")
    assert shapes.applies("decoder")
    off, on = (onnx.load(str(tmp_path / f"{n}.onnx")) for n in ("off", "on"))
    assert len(shape_reads(off)) > 20 and len(shape_reads(on)) <= 2
    assert_same_outputs(off, on, CASES[:2])


def test_a_graph_with_external_data_keeps_its_data_file(tmp_path, llava_decoder):
    path = tmp_path / "decoder.onnx"
    onnx.save_model(copy.deepcopy(llava_decoder), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="decoder.onnx.data", size_threshold=1024)
    data = (tmp_path / "decoder.onnx.data").read_bytes()
    stats = shapes.simplify_file(path)
    assert stats is not None and stats.nodes_after < stats.nodes_before
    assert hashlib.sha256((tmp_path / "decoder.onnx.data").read_bytes()).digest() == hashlib.sha256(data).digest()
    graph = onnx.load(str(path), load_external_data=False).graph
    assert any(t.data_location == TensorProto.EXTERNAL for t in graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    assert_same_outputs(llava_decoder, onnx.load(str(path)), CASES[:2])


# --- what the pass must not do ---------------------------------------------------------------------
def _graph(nodes, inputs, output, extra_inits=()):
    ints = lambda name, vals: helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals)  # noqa: E731
    inits = [ints("zero", [0]), ints("one", [1]), ints("minus1", [-1]), ints("two", [2]), *extra_inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, **arrays):
    return session(model, optimize=False).run(None, arrays)[0]


def test_a_dim_of_another_tensor_is_not_taken_for_the_datas_own():
    """Reshape(x [n, 6], [dim 0 of z [m], -1]): m is no dim of x, so the entry stays computed."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["m"])
    nodes = [
        helper.make_node("Shape", ["z"], ["zs"]),
        helper.make_node("Gather", ["zs", "zero"], ["m1"], axis=0),
        helper.make_node("Concat", ["m1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    model = _graph(nodes, [x, z], "y")
    new, _ = simplified(model)
    assert shape_reads(new) == ["z"]
    xs = np.arange(12, dtype=np.float32).reshape(2, 6)
    zs = np.zeros(3, np.float32)
    np.testing.assert_array_equal(_run(new, x=xs, z=zs), _run(model, x=xs, z=zs))


def test_no_minus_one_where_a_copied_dim_may_be_zero():
    """Reshape(x [n, k, 2], [n, 2 * k]) with nothing saying n > 0: the pass may copy n (0) but must not
    infer the other dim (-1), which is undefined for an empty x; it runs with n = 0 as before."""
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "zero"], ["n1"], axis=0),
        helper.make_node("Gather", ["xs", "one"], ["k1"], axis=0),
        helper.make_node("Mul", ["k1", "two"], ["k2"]),
        helper.make_node("Concat", ["n1", "k2"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    static = _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 2])], "y")
    new, _ = simplified(static)
    consts = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in new.graph.initializer}
    reshape = next(n for n in new.graph.node if n.op_type == "Reshape")
    assert consts.get(reshape.input[1]) == [0, 12] and not shape_reads(new)  # 12 is a constant, n is copied
    for n in (0, 3):
        xs = np.ones((n, 6, 2), np.float32)
        assert _run(new, x=xs).shape == _run(static, x=xs).shape == (n, 12)
    # with k unknown, 2k stays computed rather than becoming -1
    dynamic = _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k", 2])], "y")
    new, _ = simplified(dynamic)
    assert shape_reads(new) == ["x"]
    xs = np.ones((0, 5, 2), np.float32)
    assert _run(new, x=xs).shape == _run(dynamic, x=xs).shape == (0, 10)


def test_allowzero_reshapes_change_only_where_no_entry_can_be_zero():
    """allowzero=1 (the dynamo exporter's) reads 0 as a 0-sized dim: the pass rewrites such a Reshape
    (to allowzero=0) only where no entry can be 0. [n, -1] can: with -1, n is non-zero."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"])
    gathers = [helper.make_node("Shape", ["x"], ["xs"]),
               helper.make_node("Gather", ["xs", "zero"], ["n1"], axis=0),
               helper.make_node("Gather", ["xs", "one"], ["k1"], axis=0)]
    split = _graph([*gathers, helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
                    helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)], [x], "y")
    new, stats = simplified(split)
    reshape = next(n for n in new.graph.node if n.op_type == "Reshape")
    assert stats.reshapes == 1 and not shape_reads(new)
    assert [a.i for a in reshape.attribute if a.name == "allowzero"] == [0]
    xs = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_run(new, x=xs), _run(split, x=xs))
    # [k, n]: neither entry is the data's dim there, and either may be 0: left as it is
    swap = _graph([*gathers, helper.make_node("Concat", ["k1", "n1"], ["shape"], axis=0),
                   helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)], [x], "y")
    new, stats = simplified(swap)
    assert stats.reshapes == 0 and shape_reads(new) == ["x"]
    for xs in (np.ones((0, 3), np.float32), xs):
        assert _run(new, x=xs).shape == _run(swap, x=xs).shape == xs.shape[::-1]
