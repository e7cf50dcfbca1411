"""The three graph passes: fp16, static INT8 (Q/DQ, calibrated) and weight-only INT8. Each reads
one fp32 graph file and writes another; the exporter streams the result through `save_graph`.

INT8 is ONNX Runtime's `quantize_static` in QDQ format (docs/precision.md says why not ModelOpt):
symmetric int8 activations and weights, weights per output channel, MinMax ranges over the
calibration set. Only the linear layers (MatMul/Gemm with a stored weight) are quantized, and their
outputs are not: norms, softmax, residual and bias adds, rotary and attention's activation x
activation MatMuls stay float. The LM head stays float too (its logits pick every token).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import onnx

from . import graphs

#: ORT quantize_static settings (measured, MISSION.md): Q/DQ only where a linear layer reads
INT8_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "OpTypesToExcludeOutputQuantization": list(graphs.LINEAR_OPS),
    "DedicatedQDQPair": True,  # a Q/DQ pair per linear layer: other readers of the tensor keep the float one
}


def _load(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))  # external data, if any, is read in
    graphs.name_nodes(model)
    return model


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Raw save for save_graph to re-stream; big graphs go to one external file beside it."""
    onnx.save_model(model, str(path), save_as_external_data=not _fits_protobuf(model), all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _fits_protobuf(model) -> bool:
    return sum(t.ByteSize() for t in model.graph.initializer) < (1 << 31) - (1 << 26)


# --- fp16 --------------------------------------------------------------------------------------
def fp16_blocked_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes kept fp32 in an fp16 graph: norms' statistics, softmax, rotary angles."""
    keep = {n.name for n in model.graph.node if n.op_type in graphs.FP32_OPS}
    keep |= graphs.norm_statistics_nodes(model) | graphs.rotary_nodes(model)
    return sorted(keep)


#: graph IO that becomes fp16 in an fp16 graph: the KV cache (half the memory); the rest stays fp32
FP16_IO_PREFIXES = ("past_key_values.", "present.")


def to_fp16(src: Path, dst: Path) -> list[str]:
    """fp16 weights and compute, FP32_OPS and rotary kept fp32; IO stays fp32 (casts inside the
    graph) except the KV cache. Returns the names of the IO tensors that became fp16."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = _load(src)
    blocked = fp16_blocked_nodes(model)
    io = [v.name for v in [*model.graph.input, *model.graph.output] if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    fp32_io = [name for name in io if not name.startswith(FP16_IO_PREFIXES)]
    model = convert_float_to_float16(model, keep_io_types=fp32_io, op_block_list=DEFAULT_OP_BLOCK_LIST,
                                     node_block_list=blocked, disable_shape_infer=not _fits_protobuf(model))
    graphs.sort_topologically(model)
    graphs.drop_cast_round_trips(model, set(blocked))
    _save(model, dst)
    return [name for name in io if name not in fp32_io]


# --- weight-only INT8 ----------------------------------------------------------------------------
def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along `axis` (the output channels): (int8 weights, fp32 scales)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=reduce) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def to_int8_weight_only(src: Path, dst: Path) -> None:
    """Every linear layer's weight stored int8 + per-channel scale, read through DequantizeLinear;
    activations stay fp32 (TensorRT: weight-only INT8 with fp16 activations)."""
    from onnx import numpy_helper

    model = _load(src)
    inits = {t.name: t for t in model.graph.initializer}
    done: dict[str, str] = {}
    new_nodes, new_inits = [], []
    for node in graphs.weight_linears(model):
        name = node.input[1]
        if name not in inits or inits[name].data_type != onnx.TensorProto.FLOAT or len(inits[name].dims) != 2:
            continue
        if name not in done:
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            axis = 0 if transposed else 1  # the output channels
            q, scale = quantize_weight(numpy_helper.to_array(inits[name]), axis)
            new_inits += [numpy_helper.from_array(q, f"{name}_quantized"),
                          numpy_helper.from_array(scale, f"{name}_scale"),
                          numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero_point")]
            new_nodes.append(onnx.helper.make_node(
                "DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                [f"{name}_dequantized"], name=f"{name}_DequantizeLinear", axis=axis))
            done[name] = f"{name}_dequantized"
        node.input[1] = done[name]
    splice_dequantized(model, done, new_inits, new_nodes)
    _save(model, dst)


def splice_dequantized(model: onnx.ModelProto, replaced, new_inits: list, new_nodes: list) -> None:
    """After the linear layers read dequantized weights: drop the float initializers in `replaced`
    that no node reads any more, add the quantized ones and put the DequantizeLinear nodes first
    (they read only initializers, so the graph's order stays topological)."""
    still_used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in still_used or t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes + nodes)


# --- static INT8 ---------------------------------------------------------------------------------
class _Feeds:
    """ORT's CalibrationDataReader over a list of feed dicts (built lazily: the capture is skipped
    when the calibration cache already holds this part's ranges)."""

    def __init__(self, make_feeds):
        self._make = make_feeds
        self._it = None

    def get_next(self):
        if self._it is None:
            self._it = iter(self._make())
        return next(self._it, None)

    def rewind(self):
        self._it = None


def int8_excluded_nodes(model: onnx.ModelProto) -> list[str]:
    """Linear-op nodes left float: activation x activation MatMuls and the LM head."""
    return graphs.activation_matmuls(model) + graphs.lm_head(model)


def to_int8(src: Path, dst: Path, make_feeds, cache: Path | None) -> None:
    """Static INT8 from the feeds `make_feeds()` returns; the ranges are read from `cache` when it
    exists (then `make_feeds` is never called) and written to it otherwise."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = _load(src)
    kwargs = {}
    supports_cache = "calibration_cache_path" in inspect.signature(quantize_static).parameters
    if supports_cache and cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        kwargs["calibration_cache_path"] = cache
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs advice to run its pre-processing on every call
    named = dst.parent / (dst.name + ".named.onnx")  # quantize_static wants the node names we gave
    _save(model, named)
    try:
        quantize_static(
            str(named), str(dst), _Feeds(make_feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(graphs.LINEAR_OPS), per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=int8_excluded_nodes(model), use_external_data_format=not _fits_protobuf(model),
            calibrate_method=CalibrationMethod.MinMax, extra_options=dict(INT8_EXTRA_OPTIONS), **kwargs,
        )
    finally:
        root.setLevel(level)
        for f in (named, named.parent / (named.name + ".data")):
            f.unlink(missing_ok=True)
