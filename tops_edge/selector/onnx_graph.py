"""An onnxscript selector form -> a self-contained, checked ONNX model, as `tops-export` writes it."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx.inliner

IR_VERSION = 10  # what ONNX Runtime >= 1.20 reads

_NP_DTYPES = {"float32": np.float32, "int64": np.int64}
_ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}


def build_graph(fn, constants: dict, inputs: list, outputs: list) -> onnx.ModelProto:
    """A self-contained selector graph from an onnxscript function: `constants` (name -> (dtype, value))
    become initializers, inputs and outputs get the given TensorSpec types, local functions are inlined."""
    model = fn.to_model_proto()
    for name, (dtype, value) in constants.items():
        keep_inputs = [i for i in model.graph.input if i.name != name]
        if len(keep_inputs) == len(model.graph.input):
            raise KeyError(f"{fn.name} has no input '{name}'")
        del model.graph.input[:]
        model.graph.input.extend(keep_inputs)
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, dtype=_NP_DTYPES[dtype]), name))
    if [i.name for i in model.graph.input] != [spec.name for spec in inputs]:
        raise ValueError(f"{fn.name} takes {[i.name for i in model.graph.input]}, the part declares {[x.name for x in inputs]}")
    del model.graph.input[:]
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(s.name, _ONNX_DTYPES[s.dtype], list(s.shape)) for s in inputs
    )
    del model.graph.output[:]
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(s.name, _ONNX_DTYPES[s.dtype], list(s.shape)) for s in outputs
    )
    _align_loop_outputs(model)
    _import_function_domains(model)
    model = onnx.inliner.inline_local_functions(model)
    del model.functions[:]
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model



def _align_loop_outputs(model: onnx.ModelProto) -> None:
    """Reorder each Loop's outputs to match its body's carried outputs, by variable name.

    onnxscript 0.7 can emit a Loop whose output names are permuted against its body's carried
    outputs (it collects them from a set, so the order changes with Python's string hashing); the
    Loop's inputs and its body agree, so naming the outputs in the body's order is the repair.
    """
    def base(name: str) -> str:
        return re.sub(r"(_\d+)?(__\d+)?$", "", name)

    for graph in [model.graph, *model.functions]:
        for node in graph.node:
            if node.op_type != "Loop":
                continue
            body = next(a.g for a in node.attribute if a.name == "body")
            carried = [base(o.name) for o in body.output[1:]]
            by_name = {base(o): o for o in node.output}
            if sorted(by_name) != sorted(carried) or len(by_name) != len(carried):
                raise ValueError(f"cannot align Loop outputs {list(node.output)} with its body's {carried}")
            aligned = [by_name[name] for name in carried]
            del node.output[:]
            node.output.extend(aligned)


def _import_function_domains(model: onnx.ModelProto) -> None:
    """Give the model every opset its local functions import (e.g. the `tops` plugin domain):
    inlining moves their nodes into the graph, which must then import those domains itself."""
    have = {o.domain for o in model.opset_import}
    for fn in model.functions:
        for imp in fn.opset_import:
            if imp.domain not in have and imp.domain != fn.domain:
                model.opset_import.append(onnx.helper.make_opsetid(imp.domain, imp.version))
                have.add(imp.domain)
