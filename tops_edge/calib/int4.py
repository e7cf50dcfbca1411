"""Weight-only INT4 for the decoder (`--precision int4-wo`): blocked, symmetric INT4 weights read
through standard ONNX `DequantizeLinear` (opset 21, `block_size`), activations float.

    weight W (K inputs x N outputs, as MatMul reads it; a Gemm with transB=1 stores N x K)
    blocks   BLOCK_SIZE input channels share one fp32 scale per output channel; the last block of an
             input dimension that is not a multiple of BLOCK_SIZE is partial (ceil(K / 128) blocks:
             DequantizeLinear's blocked form allows it, so nothing is padded; a layer with K <= 128
             has one block, i.e. per output channel)
    values   q = clip(rint(W / scale), -8, 7), scale = max|W over the block| / 7, no zero point
             (symmetric: TensorRT's DequantizeLinear takes zero points of 0 only, as for int8)
    storage  two values a byte, the first in the low nibble (the ONNX INT4 layout), + fp32 scales:
             0.5 + 4 / 128 = 0.53125 bytes a weight

Scales are chosen by one of INT4_METHODS:
- `rtn`: round to nearest, as above, nothing else;
- `awq` (activation-aware, Lin et al. 2023): the linear layers reading one tensor x (q/k/v, gate/up,
  o, down, the LM head) share a per-input-channel scale s = mean|x|^alpha (normalised to a geometric
  mean of 1), the layers store quantize(diag(s) W) and read x / s. alpha is searched on AWQ_ALPHAS,
  per group, minimising the squared output error of the quantized layers on the decoder's captured
  calibration prefills (the fp32 pipeline's, as for int8); alpha = 0 is RTN, so AWQ's error on those
  activations is never above RTN's. x / s is folded into the graph without new op types: into the
  weight of a preceding Mul by a 1-D constant (the RMSNorm/LayerNorm scale as exported: q/k/v,
  gate/up and the LM head), else one `Mul(x, 1/s)` before the group (o_proj, down_proj).
  No weight clipping search (AWQ's second step) in this version.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import graphs

BLOCK_SIZE = 128
INT4_MIN, INT4_MAX = -8, 7
INT4_OPSET = 21  # DequantizeLinear with INT4 inputs and block_size
INT4_METHODS = ("awq", "rtn")
DEFAULT_INT4_METHOD = "awq"
AWQ_ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))  # 0 = RTN
AWQ_MAX_ROWS = 4096  # activation rows (tokens) kept per tensor for the alpha search; mean|x| uses all
INT4_BYTES_PER_WEIGHT = 0.5 + 4 / BLOCK_SIZE  # the planner's figure (plan/memory.py)


# --- numerics ------------------------------------------------------------------------------------
def quantize_blocked(w: np.ndarray, axis: int = 0, block: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 of a 2-D weight in blocks of `block` along `axis` (the input channels):
    (values in [-8, 7] as int8, fp32 scales with ceil(K / block) rows along `axis`)."""
    if w.ndim != 2 or axis not in (0, 1):
        raise ValueError(f"quantize_blocked takes a 2-D weight and axis 0 or 1, got shape {w.shape}, axis {axis}")
    wk = np.asarray(w, dtype=np.float32)
    wk = wk if axis == 0 else wk.T  # K x N
    k, n = wk.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = wk
    amax = np.abs(padded.reshape(blocks, block, n)).max(axis=1)  # zero padding never raises a block's max
    scale = np.where(amax > 0, amax / INT4_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(wk / np.repeat(scale, block, axis=0)[:k]), INT4_MIN, INT4_MAX).astype(np.int8)
    return (q, scale) if axis == 0 else (q.T.copy(), scale.T.copy())


def dequantize_blocked(q: np.ndarray, scale: np.ndarray, axis: int = 0, block: int = BLOCK_SIZE) -> np.ndarray:
    """The reference of DequantizeLinear's blocked form (zero point 0): q x scale repeated over its block."""
    k = q.shape[axis]
    return q.astype(np.float32) * np.repeat(scale, block, axis=axis).take(np.arange(k), axis=axis)


def pack_int4(q: np.ndarray) -> bytes:
    """Row-major INT4 bytes as ONNX stores them: two values a byte, the first in the low nibble."""
    flat = np.asarray(q, dtype=np.int8).ravel()
    if flat.size and (flat.min() < INT4_MIN or flat.max() > INT4_MAX):
        raise ValueError("pack_int4: values outside [-8, 7]")
    nibbles = (flat.astype(np.uint8) & 0x0F)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, shape) -> np.ndarray:
    """The inverse of pack_int4: int8 values of `shape`."""
    b = np.frombuffer(raw, dtype=np.uint8)
    nibbles = np.stack([b & 0x0F, b >> 4], axis=1).ravel()[: int(np.prod(shape))]
    return np.where(nibbles > 7, nibbles.astype(np.int16) - 16, nibbles).astype(np.int8).reshape(shape)


def int4_tensor(name: str, q: np.ndarray) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(q.shape))
    t.raw_data = pack_int4(q)
    return t


def awq_scale(absmean: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|x|^alpha per input channel, divided by its geometric mean (alpha = 0: all ones)."""
    s = np.power(np.maximum(absmean.astype(np.float64), 1e-8), alpha)
    s = s / np.exp(np.log(s).mean())
    return s.astype(np.float32)


def output_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray) -> float:
    """Sum over the layers of ||(x / s) dequant(quant(diag(s) W)) - x W||^2 (W: K x N each)."""
    xs = x / s
    err = 0.0
    for w in weights:
        q, scale = quantize_blocked(w * s[:, None], axis=0)
        err += float(np.square(xs @ dequantize_blocked(q, scale, axis=0) - x @ w).sum())
    return err


def search_alpha(x: np.ndarray, absmean: np.ndarray, weights: list[np.ndarray],
                 alphas=AWQ_ALPHAS) -> tuple[float, np.ndarray, dict[float, float]]:
    """(best alpha, its s, {alpha: output error}) for layers reading activations `x` (rows x K)."""
    errors = {float(a): output_error(x, weights, awq_scale(absmean, a)) for a in alphas}
    best = min(errors, key=lambda a: (errors[a], a))  # ties: the smaller alpha (0 = RTN)
    return best, awq_scale(absmean, best), errors


# --- the graph pass ------------------------------------------------------------------------------
def _linears(model: onnx.ModelProto, inits: dict) -> list[tuple[onnx.NodeProto, int]]:
    """(node, axis of the input channels in its stored weight) of each linear layer with a 2-D fp32 weight."""
    out = []
    for node in graphs.weight_linears(model):
        t = inits.get(node.input[1])
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            continue
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            continue
        out.append((node, 1 if transposed else 0))
    return out


def activation_statistics(model: onnx.ModelProto | Path, tensors: list[str], feeds: list[dict],
                          max_rows: int = AWQ_MAX_ROWS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tensor: (mean |x| per channel over every row, up to max_rows rows of x)} over the feeds, read by
    running the fp32 graph with those tensors as extra outputs (ORT, plain CPU). `model` may be the
    graph's file: then the probe is that graph's proto (weights not read) saved beside it, so it reads
    the same external data file, and a graph above protobuf's 2 GB limit (a 7B decoder) works."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if isinstance(model, Path):
        probe = onnx.load(str(model), load_external_data=False)
        _add_outputs(probe, tensors)
        path = model.with_name(model.stem + ".probe.onnx")
        try:
            onnx.save_model(probe, str(path))
            sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        finally:
            path.unlink(missing_ok=True)
    else:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        _add_outputs(probe, tensors)
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = defaultdict(int)
    rows: dict[str, list] = defaultdict(list)
    per_feed = max(1, max_rows // max(1, len(feeds)))
    for feed in feeds:
        values = sess.run(tensors, {k: feed[k] for k in inputs})
        for name, v in zip(tensors, values):
            v = np.asarray(v, np.float32).reshape(-1, v.shape[-1])
            sums[name] = sums.get(name, 0) + np.abs(v).sum(axis=0)
            counts[name] += v.shape[0]
            step = max(1, v.shape[0] // per_feed)
            rows[name].append(v[::step][:per_feed])
    return {name: (sums[name] / counts[name], np.concatenate(rows[name])[:max_rows]) for name in tensors}


def _add_outputs(probe: onnx.ModelProto, tensors: list[str]) -> None:
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors if t not in present)


def _foldable_scale(model: onnx.ModelProto, tensor: str, readers: set[str], inits: dict, uses: dict) -> TensorProto | None:
    """The 1-D constant of the Mul that produces `tensor`, when dividing it by s changes nothing but
    the group's input: the Mul's only other input is an activation, the constant is read only there,
    and `tensor` is read only by the group's layers."""
    producer = next((n for n in model.graph.node if tensor in n.output), None)
    if producer is None or producer.op_type != "Mul" or tensor in {o.name for o in model.graph.output}:
        return None
    if {n.name for n in uses[tensor]} != readers:
        return None
    consts = [i for i in producer.input if i in inits]
    if len(consts) != 1 or len(uses[consts[0]]) != 1:
        return None
    t = inits[consts[0]]
    return t if t.data_type == TensorProto.FLOAT and len(t.dims) == 1 else None


def to_int4_weight_only(src: Path, dst: Path, method: str = DEFAULT_INT4_METHOD, make_feeds=None,
                        report: dict | None = None) -> None:
    """Every decoder linear layer's weight as blocked INT4 + DequantizeLinear (module docstring).
    `method` awq needs `make_feeds()`: the captured prefill feeds of this graph. `report`, if given,
    receives {group input tensor: {"alpha": a, "errors": {alpha: error}}} (awq) for inspection."""
    from .passes import _load, _save, splice_dequantized

    if method not in INT4_METHODS:
        raise ValueError(f"int4 method '{method}' is not one of {', '.join(INT4_METHODS)}")
    model = _load(src)
    if any(n.op_type == "GroupNormalization" for n in model.graph.node):
        raise ValueError("int4-wo: the graph has GroupNormalization, whose meaning changed in opset 21")
    inits = {t.name: t for t in model.graph.initializer}
    linears = _linears(model, inits)
    uses = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            uses[i].append(n)
    weights = {name: numpy_helper.to_array(inits[name]) for name in {n.input[1] for n, _ in linears}}
    canonical = {n.name: (weights[n.input[1]] if axis == 0 else weights[n.input[1]].T) for n, axis in linears}

    scales: dict[str, np.ndarray] = {}  # group input tensor -> s (awq only)
    if method == "awq":
        groups = defaultdict(list)
        for node, _ in linears:
            groups[node.input[0]].append(node)
        readers_of_weight = defaultdict(set)
        for tensor, nodes in groups.items():
            for node in nodes:
                readers_of_weight[node.input[1]].add(tensor)
        # a weight read by layers with different inputs keeps s = 1 (one stored weight, one scaling)
        searchable = [t for t, nodes in groups.items() if all(len(readers_of_weight[n.input[1]]) == 1 for n in nodes)]
        stats = activation_statistics(Path(src), searchable, list(make_feeds()))  # the file: > 2 GB graphs too
        for tensor in searchable:
            absmean, x = stats[tensor]
            unique = list({n.input[1]: canonical[n.name] for n in groups[tensor]}.values())
            alpha, s, errors = search_alpha(x, absmean, unique)
            if report is not None:
                report[tensor] = {"alpha": alpha, "errors": errors}
            if alpha:
                scales[tensor] = s

    new_nodes, new_inits, done = [], [], {}
    for node, axis in linears:
        name = node.input[1]
        s = scales.get(node.input[0])
        key = name
        if key not in done:
            wk = canonical[node.name] * (s[:, None] if s is not None else 1.0)
            q, scale = quantize_blocked(wk if axis == 0 else wk.T, axis=axis)
            new_inits += [int4_tensor(f"{name}_int4", q), numpy_helper.from_array(scale, f"{name}_int4_scale")]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int4", f"{name}_int4_scale"],
                                              [f"{name}_dequantized"], name=f"{name}_DequantizeLinear",
                                              axis=axis, block_size=BLOCK_SIZE))
            done[key] = f"{name}_dequantized"
        node.input[1] = done[key]

    for tensor, s in scales.items():  # x / s: into the producing Mul's constant, else a Mul node
        readers = {n.name for n in model.graph.node if n.op_type in graphs.LINEAR_OPS and n.input[0] == tensor}
        const = _foldable_scale(model, tensor, readers, inits, uses)
        if const is not None and const.dims[0] == s.size:
            folded = numpy_helper.to_array(const) / s
            const.CopyFrom(numpy_helper.from_array(folded.astype(np.float32), const.name))
            continue
        inv = f"{tensor}_awq_inv_scale"
        new_inits.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        scaled = f"{tensor}_awq"
        position = next(i for i, n in enumerate(model.graph.node) if any(r == n.name for r in readers))
        model.graph.node.insert(position, helper.make_node("Mul", [tensor, inv], [scaled], name=f"{tensor}_AwqMul"))
        for n in model.graph.node:
            if n.name in readers:
                n.input[0] = scaled

    splice_dequantized(model, weights, new_inits, new_nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, INT4_OPSET)
    _save(model, dst)
