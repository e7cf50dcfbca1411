"""The paper's TOPS selector graph for `--target trt`: standard ops around one `tops::PaperSelect` node.

    image_features, keep, cls_attention (Stage I) | text_attention, text_features (Stage II)
      -> r (Stage II: the text raters'), unit rows, S = cos, validity   standard ops (tops_paper_forms)
      -> tops::PaperSelect(S, r, valid, keep) -> greedy order [B,N]      the plugin (tops_paper_kernel.py)
      -> first K of the order, sorted ascending, gathered                standard ops (Slice, TopK)
Same IO as the ORT form (tops_paper.tops_paper_onnx): kept_indices [B,K] int64, selected_features
[B,K,D]. One graph per stage: the norm is a plugin attribute, not a graph choice. ONNX Runtime cannot
run it; TensorRT's ONNX parser finds the plugin by op type `PaperSelect` and `plugin_namespace` once
`tops_edge.plugins.load_paper()` has registered it. `aot=1` asks for the compiled kernel.
"""

from __future__ import annotations

import onnx
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op

from ..selector.onnx_forms import _budget, _gathered
from ..selector.tops_paper_forms import _text_rater_relevance, _tops_paper_prepare
from . import PAPER_PLUGIN_NAME, PLUGIN_NAMESPACE
from .onnx_form import tops

PAPER_PLUGIN_ATTRIBUTES = ("alpha", "lam", "relevance_weight", "norm")


@script()
def _paper_select_with_plugin(image_features: FLOAT["B", "N", "D"], keep: INT64, relevance: FLOAT["B", "N"]):
    one = op.Constant(value_ints=[1])
    sim, r, valid = _tops_paper_prepare(image_features, relevance)  # r, valid [B,1,N]
    k = _budget(image_features, keep)
    k1 = op.Reshape(k, one)
    # attribute values are placeholders, set per export by `set_paper_plugin_attributes`
    order, scratch = tops.PaperSelect(sim, op.Squeeze(r, one), op.Cast(op.Squeeze(valid, one), to=6), op.Cast(k1, to=6),
                                      alpha=0.0, lam=0.0, relevance_weight=1.0, norm="minmax",
                                      plugin_namespace="tops", aot=1)
    first = op.Slice(order, op.Constant(value_ints=[0]), k1, one)
    # ascending via TopK on float (TensorRT has no double; indices < 2^24 are exact in fp32)
    values, _ = op.TopK(op.Cast(first, to=1), k1, axis=1, largest=0, sorted=1)
    kept_indices = op.Cast(values, to=7)
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def paper_plugin_graph_vision(image_features: FLOAT["B", "N", "D"], keep: INT64, cls_attention: FLOAT["B", "N"]):
    kept_indices, selected_features = _paper_select_with_plugin(image_features, keep, cls_attention)
    return kept_indices, selected_features


@script()
def paper_plugin_graph_cut(image_features: FLOAT["B", "N", "D"], keep: INT64, text_attention: FLOAT["B", "Q", "N"],
                           text_features: FLOAT["B", "Q", "D"], rater_sqrt_d: FLOAT):
    rel = _text_rater_relevance(image_features, text_features, text_attention, rater_sqrt_d)
    kept_indices, selected_features = _paper_select_with_plugin(image_features, keep, rel)
    return kept_indices, selected_features


def paper_plugin_form(params: dict, stage: str):
    """(onnxscript function, constants) for selector.onnx_graph.build_graph; graph inputs as
    tops_paper.tops_paper_onnx's (image_features, keep, then tops_paper_inputs(params, stage))."""
    from ..selector import tops_paper

    p = tops_paper.check_params(params, stage)
    if stage == "vision":
        return paper_plugin_graph_vision, {}
    return paper_plugin_graph_cut, {"rater_sqrt_d": ("float32", 1.0 if p["rater_scaling"] == "sqrt_d" else 0.0)}


def paper_plugin_nodes(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.op_type == PAPER_PLUGIN_NAME and n.domain == PLUGIN_NAMESPACE]


def set_paper_plugin_attributes(model: onnx.ModelProto, params: dict, stage: str) -> onnx.ModelProto:
    """Write this export's alpha, lam, relevance weight and norm (tops_paper.check_params) onto the node."""
    from ..selector import tops_paper

    p = tops_paper.check_params(params, stage)
    values = {"alpha": p["alpha"], "lam": p["lam"], "relevance_weight": p["relevance"], "norm": p["norm"]}
    nodes = paper_plugin_nodes(model)
    if len(nodes) != 1:
        raise ValueError(f"expected one {PLUGIN_NAMESPACE}::{PAPER_PLUGIN_NAME} node, found {len(nodes)}")
    for attr in nodes[0].attribute:
        if attr.name == "norm":
            attr.s = values["norm"].encode()
        elif attr.name in values:
            attr.f = float(values[attr.name])
    return model


def paper_plugin_model(params: dict, stage: str, inputs: list, outputs: list) -> onnx.ModelProto:
    """The checked selector graph with the plugin node, for the part's declared IO."""
    from ..selector.onnx_graph import build_graph

    fn, constants = paper_plugin_form(params, stage)
    return set_paper_plugin_attributes(build_graph(fn, constants, inputs, outputs), params, stage)
