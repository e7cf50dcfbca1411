"""The selector graph for `--target trt`: standard ops around one `tops::Select` plugin node.

    image_features, instruction (, vision_features)
      -> unit similarity rows, S = (f f^T) * G, cos(v_i, q_bar), validity  standard ops (GEMMs; G the spatial factor)
      -> tops::Select(S, cos, valid, keep) -> greedy order [B,N]         the plugin (kernel.py)
      -> first K of the order, sorted ascending, gathered                standard ops (Slice, TopK)
Same IO as the ORT form (selector/base.py), so the runtime and manifest do not change. ONNX Runtime
cannot run it (it has no tops::Select); TensorRT's ONNX parser finds the plugin by op type `Select`
and the `plugin_namespace` attribute once `tops_edge.plugins.load()` has registered it. `aot=1` asks
the parser for the compiled kernel (an engine that runs without Python).
"""

from __future__ import annotations

import onnx
from onnxscript import BOOL, FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from ..selector.onnx_forms import _budget, _gathered, _instruction_cosine, _row_inverse_norms, _spatial_factor, _unit_rows
from . import PLUGIN_NAME, PLUGIN_NAMESPACE

tops = Opset(PLUGIN_NAMESPACE, 1)
PLUGIN_ATTRIBUTES = ("alpha", "beta", "relevance_sign")


@script()
def _select_with_plugin(image_features: FLOAT["B", "N", "D"], keep: INT64, f: FLOAT["B", "N", "E"], inv: FLOAT["B", "N", 1],
                        valid: BOOL["B", "N"], instruction_embeds: FLOAT["B", "M", "D"], instruction_mask: INT64["B", "M"],
                        grid_h: INT64, grid_w: INT64, spatial: FLOAT):
    g = _spatial_factor(image_features, keep, grid_h, grid_w, spatial)
    similarity = op.Mul(op.MatMul(f, op.Transpose(f, perm=[0, 2, 1])), g)
    cosine = _instruction_cosine(image_features, inv, instruction_embeds, instruction_mask)
    k = _budget(image_features, keep)
    k32 = op.Reshape(op.Cast(k, to=6), op.Constant(value_ints=[1]))
    # attribute values are placeholders, set per export by `plugin_graph`
    order, scratch = tops.Select(similarity, cosine, op.Cast(valid, to=6), k32, alpha=0.0, beta=0.0,
                                 relevance_sign=1.0, plugin_namespace="tops", aot=1)
    first = op.Slice(order, op.Constant(value_ints=[0]), op.Reshape(k, op.Constant(value_ints=[1])), op.Constant(value_ints=[1]))
    # ascending via TopK on float (TensorRT has no double; indices < 2^24 are exact in fp32)
    values, _ = op.TopK(op.Cast(first, to=1), op.Reshape(k, op.Constant(value_ints=[1])), axis=1, largest=0, sorted=1)
    kept_indices = op.Cast(values, to=7)
    selected_features = _gathered(kept_indices, image_features)
    return kept_indices, selected_features


@script()
def plugin_graph_projected(image_features: FLOAT["B", "N", "D"], keep: INT64, instruction_embeds: FLOAT["B", "M", "D"],
                           instruction_mask: INT64["B", "M"], grid_h: INT64, grid_w: INT64, spatial: FLOAT):
    f, inv, valid = _unit_rows(image_features)
    kept_indices, selected_features = _select_with_plugin(image_features, keep, f, inv, valid, instruction_embeds, instruction_mask,
                                                          grid_h, grid_w, spatial)
    return kept_indices, selected_features


@script()
def plugin_graph_vision(image_features: FLOAT["B", "N", "D"], keep: INT64, instruction_embeds: FLOAT["B", "M", "D"],
                        instruction_mask: INT64["B", "M"], vision_features: FLOAT["B", "N", "E"], grid_h: INT64,
                        grid_w: INT64, spatial: FLOAT):
    inv, valid_v = _row_inverse_norms(image_features)
    f, _, valid_f = _unit_rows(vision_features)
    valid = op.And(op.Squeeze(valid_v, op.Constant(value_ints=[-1])), valid_f)
    kept_indices, selected_features = _select_with_plugin(image_features, keep, f, inv, valid, instruction_embeds, instruction_mask,
                                                          grid_h, grid_w, spatial)
    return kept_indices, selected_features


def plugin_form(params: dict):
    """(onnxscript function, constants) for selector.onnx_graph.build_graph, like SelectorInfo.onnx_form."""
    from ..selector.methods import _spatial

    return (plugin_graph_vision if params["similarity"] == "vision" else plugin_graph_projected), {
        "spatial": ("float32", _spatial(params))}


def set_plugin_attributes(model: onnx.ModelProto, params: dict) -> onnx.ModelProto:
    """Write alpha, beta and relevance_sign of this export onto the plugin node."""
    nodes = plugin_nodes(model)
    if len(nodes) != 1:
        raise ValueError(f"expected one {PLUGIN_NAMESPACE}::{PLUGIN_NAME} node, found {len(nodes)}")
    node = nodes[0]
    for attr in node.attribute:
        if attr.name in PLUGIN_ATTRIBUTES:
            attr.f = float(params[attr.name])
    return model


def plugin_nodes(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.op_type == PLUGIN_NAME and n.domain == PLUGIN_NAMESPACE]


def plugin_model(params: dict, inputs: list, outputs: list) -> onnx.ModelProto:
    """The checked selector graph with the plugin node, for the part's declared IO."""
    from ..selector.onnx_graph import build_graph

    fn, constants = plugin_form(params)
    return set_plugin_attributes(build_graph(fn, constants, inputs, outputs), params)
