"""--target trt: the selector graph carries the tops::Select plugin node with this export's
attributes, computes what the reference computes around it, and every TensorRT command fails with
one line naming the missing package where TensorRT is absent (as on this machine)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from tops_edge.cli import build_main, run_main
from tops_edge.export import export_model
from tops_edge.plugins.onnx_form import plugin_nodes
from tops_edge.plugins.reference import select_order
from tops_edge.selector.dpp import dpp_select
from tops_edge.selector.merge import merge_dropped, merge_groups
from cli_helpers import EXAMPLE, one_line_error

try:
    import tensorrt  # noqa: F401

    HAS_TRT = True
except Exception:
    HAS_TRT = False
no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-package errors cannot happen")


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory, tiny):
    return export_model(tiny, tmp_path_factory.mktemp("trt") / "tiny-trt", selector="dpp-merge", keep=64, target="trt",
                        selector_params={"alpha": 0.75, "beta": 0.25}, progress=False)


def test_trt_selector_graph_has_the_plugin_node_and_its_attributes(trt_export):
    model = onnx.load(str(trt_export / "selector.onnx"))
    (node,) = plugin_nodes(model)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, node.op_type) == ("tops", "Select")
    assert attrs == {"alpha": 0.75, "beta": 0.25, "relevance_sign": 1.0, "plugin_namespace": b"tops", "aot": 1}
    assert len(node.input) == 4 and len(node.output) == 2
    assert {"tops": 1}.items() <= {o.domain: o.version for o in model.opset_import}.items()
    assert [i.name for i in model.graph.input] == ["image_features", "keep", "instruction_embeds", "instruction_mask",
                                                   "vision_features", "grid_h", "grid_w"]
    assert [o.name for o in model.graph.output] == ["kept_indices", "selected_features", "merged_features", "kept_sizes",
                                                    "token_groups"]
    manifest = json.loads((trt_export / "manifest.json").read_text())
    assert manifest["target"] == "trt" and manifest["footprint"]["tokens_per_image"] == 576


def test_ort_selector_graph_has_standard_ops_only(tiny_uniform_dir, tmp_path, tiny):
    out = export_model(tiny, tmp_path / "ort", selector="dpp-merge", keep=64, progress=False)
    model = onnx.load(str(out / "selector.onnx"))
    assert not plugin_nodes(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}


def test_trt_selector_graph_around_the_plugin_equals_the_reference(trt_export, one_torch_thread):
    """The graph's standard ops run in ONNX's reference evaluator with tops::Select implemented by the
    plugin's torch semantics: kept indices and features equal the selector reference."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class Select(OpRun):
        op_domain = "tops"

        def _run(self, similarity, cosine, valid, keep, alpha=None, beta=None, relevance_sign=None, plugin_namespace=None, aot=None):
            order = select_order(torch.from_numpy(similarity), torch.from_numpy(cosine), torch.from_numpy(valid),
                                 int(keep[0]), alpha=alpha, beta=beta, sign=relevance_sign)
            return order.numpy(), np.zeros_like(similarity)

    class GatherElements(OpRun):  # the evaluator's own uses np.choose, which takes at most 64 choices
        def _run(self, data, indices, axis=None):
            return (np.take_along_axis(data, indices, axis=axis),)

    model = onnx.load(str(trt_export / "selector.onnx"))
    g = np.random.default_rng(0)
    feeds = {
        "image_features": g.standard_normal((1, 576, 64), dtype=np.float32),
        "instruction_embeds": g.standard_normal((1, 7, 64), dtype=np.float32),
        "instruction_mask": np.ones((1, 7), dtype=np.int64),
        "vision_features": g.standard_normal((1, 576, 32), dtype=np.float32),
        "grid_h": np.array(24, dtype=np.int64), "grid_w": np.array(24, dtype=np.int64),
    }
    run = ReferenceEvaluator(model, new_ops=[Select, GatherElements])
    spatial = json.loads((trt_export / "manifest.json").read_text())["selector"]["params"]["spatial"]
    assert spatial > 0  # the export's default: the graph builds the spatial factor before the plugin
    t = {k: torch.from_numpy(v) for k, v in feeds.items() if k not in ("grid_h", "grid_w")}
    for keep in (1, 64, 576):
        kept, selected, merged, sizes, groups = run.run(None, dict(feeds, keep=np.array(keep, dtype=np.int64)))
        expected = dpp_select(t["image_features"], t["instruction_embeds"], t["instruction_mask"], keep, alpha=0.75,
                              beta=0.25, sign=1.0, vision_features=t["vision_features"], spatial=spatial, grid=(24, 24))
        assert np.array_equal(kept, expected.numpy())
        assert np.array_equal(selected, feeds["image_features"][:, kept[0]])
        ref_merged, ref_sizes = merge_dropped(feeds["image_features"][0], kept[0])  # the merge tail after the plugin
        assert np.array_equal(sizes[0], ref_sizes)
        assert np.array_equal(groups[0], merge_groups(feeds["image_features"][0], kept[0]))
        np.testing.assert_allclose(merged[0], ref_merged, rtol=1e-5, atol=1e-5)


@no_trt
def test_plugins_load_without_tensorrt_names_the_package():
    from tops_edge import plugins
    from tops_edge.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"`tensorrt`.*JetPack.*pypi\.nvidia\.com"):
        plugins.load()


@no_trt
def test_trt_backend_without_tensorrt_names_the_package(trt_export):
    from tops_edge.errors import BackendUnavailableError
    from tops_edge.runtime import Pipeline, get_backend

    with pytest.raises(BackendUnavailableError, match=r"`tensorrt`.*JetPack"):
        get_backend("trt")
    with pytest.raises(BackendUnavailableError, match=r"`tensorrt`.*JetPack"):
        Pipeline.load(trt_export, backend="trt")


@no_trt
@pytest.mark.parametrize("command", [
    lambda d: run_main([str(d), "--image", str(EXAMPLE), "--prompt", "Hi", "--backend", "trt"]),
    lambda d: build_main([str(d), "--device", "orin-nano"]),
    lambda d: build_main([str(d), "--device", "thor", "--precision", "fp16", "--timing-cache", str(d / "t.cache")]),
], ids=["tops-run --backend trt", "tops-build", "tops-build --timing-cache"])
def test_tensorrt_commands_without_tensorrt_fail_with_one_line(trt_export, capsys, command):
    line = one_line_error(capsys, command(trt_export))
    assert "`tensorrt`" in line and "JetPack" in line and "pypi.nvidia.com" in line
    assert not list(trt_export.glob("*.engine")) and not (trt_export / "engines.json").exists()


def test_trt_export_on_the_ort_backend_fails_with_one_line(trt_export, capsys):
    line = one_line_error(capsys, run_main([str(trt_export), "--image", str(EXAMPLE), "--prompt", "Hi"]))
    assert "--target trt" in line and "backend 'trt'" in line


def test_build_int8_needs_a_qdq_export(trt_export, capsys):
    line = one_line_error(capsys, build_main([str(trt_export), "--device", "orin-nano", "--precision", "int8"]))
    assert "Q/DQ" in line and "--precision int8" in line


def test_build_dry_run_prints_plan_and_profiles_without_tensorrt(trt_export, capsys):
    assert build_main([str(trt_export), "--device", "orin-nx", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: tiny-llava on orin-nx" in out and "verdict: fits" in out
    assert "keep" in out and "(1,) / (128,) / (576,) (values)" in out


def test_build_help_exits_zero(capsys):
    assert build_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--device" in out and "--timing-cache" in out


def test_verify_trt_script_commands_parse():
    """scripts/verify_trt.sh cannot run here (no TensorRT): its tops-export / tops-build lines at least
    name flags and choices the parsers take."""
    import re
    import shlex
    from pathlib import Path

    from tops_edge.cli import build_parser, export_parser

    text = Path(__file__).resolve().parents[1].joinpath("scripts", "verify_trt.sh").read_text().replace("\\\n", " ")
    values = {"$OUT": "out", "$DEVICE": "rtx", "$QWEN": "tiny-qwen3-vl", "$METHOD": "awq"}
    seen = {"tops-export": 0, "tops-build": 0}
    for line in text.splitlines():
        match = re.search(r"(?:step \"[^\"]*\" |^|if )(tops-(?:export|build)) (.*?)(?:2>.*)?$", line.strip())
        if not match:
            continue
        args = match.group(2)
        for key, value in values.items():
            args = args.replace(key, value)
        parser = export_parser() if match.group(1) == "tops-export" else build_parser()
        parser.parse_args(shlex.split(args.split(";")[0]))
        seen[match.group(1)] += 1
    assert seen["tops-export"] >= 8 and seen["tops-build"] >= 7  # every line of the script, found
