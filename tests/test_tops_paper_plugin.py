"""tops::PaperSelect (the paper's TOPS greedy as a TensorRT plugin): its torch semantics equal
tops_paper.tops_order; the plugin graph of each stage is a valid ONNX model whose node carries the
export's attributes, and around the plugin (run here by ONNX's reference evaluator with the torch
semantics) it returns what tops_paper_reference returns. No TensorRT or GPU needed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tops_edge.models import TensorSpec
from tops_edge.plugins.tops_paper_onnx_form import paper_plugin_model, paper_plugin_nodes
from tops_edge.plugins.tops_paper_reference import paper_plugin_inputs, paper_select_order
from tops_edge.selector import tops_paper as T

from test_selector import make_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HIDDEN = 16


@pytest.mark.parametrize("norm", T.NORMS)
def test_plugin_semantics_equal_tops_order_for_every_budget(norm):
    rng = np.random.default_rng(7)
    x = make_inputs(rng, 2, 20, duplicates=2, degenerate=2)
    f, r = torch.from_numpy(x["image_features"]), torch.from_numpy(x["cls_attention"])
    s, rel, v = paper_plugin_inputs(f, r)
    for weights in ((1.0, 0.5, 0.5), (0.0, 0.5, 0.5), (1.0, 0.0, 1.0)):
        p = dict(relevance_weight=weights[0], alpha=weights[1], lam=weights[2], norm=norm)
        for keep in (0, 1, 7, 20, 25):
            order = paper_select_order(s, rel, v, keep, **p)
            steps = max(1, min(keep, 20))
            assert order.dtype == torch.int32 and order.shape == (2, 20)
            assert torch.equal(order[:, :steps].long(), T.tops_order(f, r, keep, **p)) and (order[:, steps:] == -1).all()


def _specs(stage):
    extra = {"vision": [TensorSpec("cls_attention", "float32", ("num_images", "tokens"))],
             "llm": [TensorSpec("text_attention", "float32", ("num_images", "queries", "tokens")),
                     TensorSpec("text_features", "float32", ("num_images", "queries", HIDDEN))]}[stage]
    inputs = [TensorSpec("image_features", "float32", ("num_images", "tokens", HIDDEN)), TensorSpec("keep", "int64", ()),
              *extra]
    outputs = [TensorSpec("kept_indices", "int64", ("num_images", "kept")),
               TensorSpec("selected_features", "float32", ("num_images", "kept", HIDDEN))]
    return inputs, outputs


@pytest.mark.parametrize("stage, params, attrs", [
    ("vision", {}, {"alpha": 0.5, "lam": 0.5, "relevance_weight": 1.0, "norm": b"minmax"}),
    ("vision", {"alpha": 0.25, "lam": 0.0, "norm": "mean"}, {"alpha": 0.25, "lam": 0.0, "relevance_weight": 1.0, "norm": b"mean"}),
    ("llm", {"relevance": 0.0, "lam": 1.0, "rater_scaling": "sqrt_d"},
     {"alpha": 0.5, "lam": 1.0, "relevance_weight": 0.0, "norm": b"minmax"}),
])
def test_plugin_graph_has_the_node_and_the_exports_attributes(stage, params, attrs):
    inputs, outputs = _specs(stage)
    model = paper_plugin_model(params, stage, inputs, outputs)
    onnx.checker.check_model(model)
    (node,) = paper_plugin_nodes(model)
    got = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, node.op_type) == ("tops", "PaperSelect")
    assert got == {**attrs, "plugin_namespace": b"tops", "aot": 1}
    assert len(node.input) == 4 and len(node.output) == 2
    assert {"tops": 1}.items() <= {o.domain: o.version for o in model.opset_import}.items()
    assert [i.name for i in model.graph.input] == [s.name for s in inputs]
    assert [o.name for o in model.graph.output] == ["kept_indices", "selected_features"]
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx", "tops"}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the evaluator's 1/|row| on degenerate rows, masked
@pytest.mark.parametrize("stage, norm", [("vision", "minmax"), ("llm", "mean")])
def test_plugin_graph_around_the_plugin_equals_the_reference(stage, norm):
    """The graph's standard ops in ONNX's reference evaluator, tops::PaperSelect by its torch semantics."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class PaperSelect(OpRun):
        op_domain = "tops"

        def _run(self, similarity, relevance, valid, keep, alpha=None, lam=None, relevance_weight=None, norm=None,
                 plugin_namespace=None, aot=None):
            order = paper_select_order(torch.from_numpy(similarity), torch.from_numpy(relevance), torch.from_numpy(valid),
                                       int(keep[0]), alpha=alpha, lam=lam, relevance_weight=relevance_weight,
                                       norm=norm.decode() if isinstance(norm, bytes) else norm)
            return order.numpy(), np.zeros_like(relevance)

    class GatherElements(OpRun):  # the evaluator's own uses np.choose, which takes at most 64 choices
        def _run(self, data, indices, axis=None):
            return (np.take_along_axis(data, indices, axis=axis),)

    params = {"norm": norm, "lam": 0.75}
    inputs, outputs = _specs(stage)
    run = ReferenceEvaluator(paper_plugin_model(params, stage, inputs, outputs), new_ops=[PaperSelect, GatherElements])
    rng = np.random.default_rng(11)
    x = make_inputs(rng, 2, 30, duplicates=2, degenerate=2)
    x["text_features"] = rng.standard_normal((2, 3, HIDDEN)).astype(np.float32)
    feeds = {s.name: x[s.name] for s in inputs if s.name != "keep"}
    for keep in (1, 9, 30):
        kept, selected = run.run(None, dict(feeds, keep=np.array(keep, dtype=np.int64)))
        want = T.tops_paper_reference({k: torch.from_numpy(v) for k, v in feeds.items()}, keep, params, stage).numpy()
        assert np.array_equal(kept, want)
        assert np.array_equal(selected, np.take_along_axis(feeds["image_features"], want[..., None], axis=1), equal_nan=True)
