"""What the precision passes need to know about an exported graph: which nodes are linear layers,
which compute norm statistics or rotary angles, which MatMul is the LM head. Read from the graph's
structure, so one pass serves every family the exporter produces."""

from __future__ import annotations

from collections import defaultdict

import onnx

#: ops that stay fp32 in fp16 graphs whatever their inputs: normalisation statistics and softmax
#: accumulation overflow or lose the small terms in fp16
FP32_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization",
            "InstanceNormalization", "Softmax", "LogSoftmax", "ReduceMean", "Pow", "Sqrt", "Reciprocal")
#: the only ops INT8 touches (their inputs); the rest stays float
LINEAR_OPS = ("MatMul", "Gemm")


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the block and exclude lists are by name)."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def initializer_names(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    names.update(n.output[0] for n in model.graph.node if n.op_type == "Constant")
    return names


def weight_linears(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul/Gemm nodes whose second input is a stored weight: the model's linear layers."""
    weights = initializer_names(model)
    return [n for n in model.graph.node if n.op_type in LINEAR_OPS and len(n.input) > 1 and n.input[1] in weights]


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls of two activations (attention's QK^T and PV): their softmax side stays float."""
    linear = {n.name for n in weight_linears(model)}
    return [n.name for n in model.graph.node if n.op_type in LINEAR_OPS and n.name not in linear]


def _producers(model):
    return {out: node for node in model.graph.node for out in node.output}


def ancestors(model: onnx.ModelProto, start: list[onnx.NodeProto]) -> set[str]:
    """Names of `start` and every node they depend on."""
    producer = _producers(model)
    todo, seen = list(start), set()
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        todo.extend(producer[i] for i in node.input if i in producer)
    return seen


def rotary_nodes(model: onnx.ModelProto) -> set[str]:
    """Cos/Sin and what computes their angles (positions x inverse frequencies): in fp16, positions
    past 2048 lose their low bits, so rotary angles are computed in fp32 as HF does."""
    return ancestors(model, [n for n in model.graph.node if n.op_type in ("Cos", "Sin")])


def norm_statistics_nodes(model: onnx.ModelProto) -> set[str]:
    """RMSNorm/LayerNorm written out as ops (Pow -> ReduceMean -> Add eps -> Sqrt -> Div): the
    ReduceMean and the nodes after it up to the division by the root. The variance of a 7B's hidden
    states overflows fp16, so the whole chain stays fp32."""
    consumers = defaultdict(list)
    for node in model.graph.node:
        for i in node.input:
            consumers[i].append(node)
    chain = set()
    for node in model.graph.node:
        if node.op_type != "ReduceMean":
            continue
        todo = [node]
        while todo:
            cur = todo.pop()
            chain.add(cur.name)
            if cur.op_type in ("Div", "Reciprocal"):
                continue
            todo.extend(c for o in cur.output for c in consumers[o]
                        if c.op_type in ("Add", "Sqrt", "Div", "Reciprocal", "ReduceMean"))
    return chain


def lm_head(model: onnx.ModelProto, output: str = "logits") -> list[str]:
    """The linear layers that produce OUTPUT (through reshapes, slices, casts): one node, or one per
    vocabulary chunk where the head is split (their outputs concatenated; models/base.py
    ChunkedLMHead); [] if OUTPUT comes from no linear layer."""
    producer = _producers(model)
    found, todo = [], [output]
    while todo:
        name = todo.pop(0)
        node = producer.get(name)
        if node is None:
            continue
        if node.op_type in LINEAR_OPS:
            found.append(node.name)
        elif node.op_type == "Concat":
            todo.extend(node.input)
        elif node.input:
            todo.append(node.input[0])
    return found


def q_dq_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def sort_topologically(model: onnx.ModelProto) -> None:
    """Reorder the top graph's nodes so each follows its producers (the fp16 converter appends
    its input casts at the end; the ONNX checker insists on the order)."""
    unique, seen = [], set()
    for node in model.graph.node:  # the converter can emit the same Cast twice for two blocked consumers
        if node.op_type == "Cast" and tuple(node.output) in seen:
            continue
        seen.add(tuple(node.output))
        unique.append(node)
    produced = {out: node.name for node in unique for out in node.output}
    pending = unique
    done: set[str] = set()
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i == "" or i not in produced or produced[i] in done for i in node.input):
                ordered.append(node)
                done.add(node.name)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle at node {rest[0].name}")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def drop_cast_round_trips(model: onnx.ModelProto, fp32_nodes: set[str]) -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs; returns how many. The fp16 converter puts one on every
    edge between two nodes it keeps in fp32 (e.g. the rotary angle chain), which rounds the value to
    fp16 all the same: positions x frequencies lost ~0.1 in cos/sin at position 600. Only pairs whose
    source is known fp32 (an output of `fp32_nodes`, of a Cast to fp32, or an fp32 graph input)."""
    producer = _producers(model)
    fp32 = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    outputs = {o.name for o in model.graph.output}
    to = lambda node: next((a.i for a in node.attribute if a.name == "to"), None)  # noqa: E731
    replace = {}
    for node in model.graph.node:
        if node.op_type != "Cast" or to(node) != onnx.TensorProto.FLOAT or node.output[0] in outputs:
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Cast" or to(first) != onnx.TensorProto.FLOAT16:
            continue
        source = producer.get(first.input[0])
        if first.input[0] in fp32 or (source is not None and (source.name in fp32_nodes or (
                source.op_type == "Cast" and to(source) == onnx.TensorProto.FLOAT))):
            replace[node.output[0]] = first.input[0]
    if not replace:
        return 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    stale = set(replace) | set(replace.values())  # the converter typed these fp16
    infos = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)
    used = {i for node in model.graph.node for i in node.input} | outputs
    kept = [n for n in model.graph.node if n.op_type != "Cast" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(replace)
