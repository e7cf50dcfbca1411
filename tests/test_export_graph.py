"""Graph files: external data is merged into one `.data` file, readable, never appended to a stale one."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tops_edge.export import onnx_export


def _matmul_model(rng) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    w1 = rng.standard_normal((64, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), w1, w2


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_per_tensor_external_files_are_streamed_into_one_data_file(tmp_path):
    rng = np.random.default_rng(0)
    model, w1, w2 = _matmul_model(rng)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    onnx.save_model(model, str(scratch / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(scratch.iterdir())) == 3  # graph + one file per tensor, like the legacy exporter above 2 GB
    out = tmp_path / "out"
    out.mkdir()
    (out / "part.onnx.data").write_bytes(b"stale" * 1000)  # must be replaced, not appended to
    files = onnx_export.save_graph(scratch / "model.onnx", out / "part.onnx")
    assert files == ["part.onnx", "part.onnx.data"]
    assert (out / "part.onnx.data").stat().st_size == w1.nbytes + w2.nbytes
    x = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(out / "part.onnx", x), x @ w1 @ w2, rtol=1e-5, atol=1e-4)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "part.onnx.data").stat().st_mode & 0o777 == 0o666 & ~umask


def test_large_inline_weights_move_to_external_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    model, w1, w2 = _matmul_model(rng)
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)
    files = onnx_export.save_graph(tmp_path / "model.onnx", tmp_path / "part.onnx")
    assert files == ["part.onnx", "part.onnx.data"]
    assert (tmp_path / "part.onnx").stat().st_size < 1024
    x = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "part.onnx", x), x @ w1 @ w2, rtol=1e-5, atol=1e-4)


def test_small_graph_stays_one_file_even_beside_an_old_data_file(tmp_path):
    model, _, _ = _matmul_model(np.random.default_rng(2))
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    (tmp_path / "part.onnx.data").write_bytes(b"old")
    assert onnx_export.save_graph(tmp_path / "model.onnx", tmp_path / "part.onnx") == ["part.onnx"]
    assert not (tmp_path / "part.onnx.data").exists()


def test_decoder_graph_reads_the_kv_cache_without_copies(tiny_none_dir):
    """Each layer's attention multiplies by its past K (transposed inside the matmul) and V directly:
    no Expand / Tile (HF's repeat_kv for grouped heads), no Mul (the SDPA export's scaled copy of K),
    no Concat with the new rows and no ScatterND (a written copy) touches the cache. present is only
    the step's rows [B, H, S, D], which the attention reads the same way."""
    import onnx

    graph = onnx.load(str(tiny_none_dir / "decoder.onnx"), load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    assert not {n.op_type for n in graph.node} & {"ScatterND", "ScatterElements"}
    pasts = [i.name for i in graph.input if i.name.startswith("past_key_values.")]
    presents = [o for o in graph.output if o.name.startswith("present.")]
    assert pasts and len(presents) == len(pasts)
    for out in presents:
        dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        assert dims[2] == "sequence" and dims[2] != "cache_sequence", (out.name, dims)
    for name in pasts + [o.name for o in presents]:
        ops = {n.op_type for n in consumers.get(name, [])}
        assert not ops & {"Expand", "Tile", "Mul", "Unsqueeze", "Concat", "ScatterND"}, (name, ops)
        if name.endswith(".value"):
            assert ops == {"MatMul"}, (name, ops)
        else:
            assert ops <= {"Transpose", "MatMul", "Shape"}, (name, ops)


def test_the_torch_model_is_released_before_the_precision_passes(tmp_path, monkeypatch):
    """A model tops-export loaded itself is freed before the fp16 / int8 / int4 passes, so its fp32
    weights and the passes' copies are never in host RAM together (plan/build.py counts them apart)."""
    import gc
    import weakref

    import tops_edge.calib as calib
    import tops_edge.export.exporter as exporter

    real_load, real_convert, loaded, alive = exporter.load, calib.convert_parts, [], []

    def load(spec):
        adapter = real_load(spec)
        loaded.append(weakref.ref(adapter.model))
        return adapter

    def convert(*args, **kwargs):
        gc.collect()
        alive.append([ref() is not None for ref in loaded])
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(exporter, "load", load)
    monkeypatch.setattr(calib, "convert_parts", convert)
    exporter.export_model("tiny-llava", tmp_path / "wo", precision="int8-wo", progress=False)
    assert alive == [[False]]
