"""A graph pass that removes shape arithmetic the exporter traced from `view(*shape, -1, d)` and the like.

torch.onnx traces every `x.view(b, s, -1, d)` with dynamic dims into Shape -> Gather -> Unsqueeze ->
Concat -> Reshape; a decoder layer holds a dozen such chains (the q/k/v head splits, our grouped
attention's folds, rotary's `x[..., : d // 2]`), which ONNX Runtime runs at every decode step: on
tiny-llava-medium about 150 of the ~400 nodes left after its own optimizer. This pass proves, from
the graph's structure alone, what those chains compute and replaces them with constants:

* Every tensor gets a symbolic shape: a polynomial in the graph inputs' named dims (`batch`,
  `sequence`, ...; ONNX reads one name as one size in every input, and TensorRT checks that it is)
  or in a fresh symbol that stands for one unknown dim and only ever equals itself. Small integer
  tensors get a symbolic value (Shape -> dims, Gather, Concat, Unsqueeze, integer arithmetic).
  The rules are written here for the ops the exporters emit; any other op's outputs are unknown,
  so it only ever loses a proof, never makes a wrong one.
* A Reshape (allowzero=0) whose shape entry k provably equals the data's dim k gets 0 there ("copy
  that dim"); if one entry is left unknown and every other one is provably non-zero, it becomes
  -1. A shape with no unknown entry left is one int64 constant. Expand entries equal to the
  input's dim become 1 (the broadcast of d and 1 is d).
* Any node input whose value is then a known constant (rotary's `d // 2`, `heads // kv_heads`, a
  static dim read by Shape) is replaced by a constant, and the nodes nobody reads any more go.

"Provably non-zero" comes from the graph itself: a Reshape with -1 is defined only when the other
output dims multiply to a non-zero size (ONNX, and ONNX Runtime refuses otherwise), so the dims of
the q/k/v head split (`batch`, `sequence`) are non-zero in every run the graph can make. Nothing
reads a tensor's value at run time, weights stay where they are (external data is never loaded),
and only standard ONNX is written (Reshape's 0 with allowzero=0 is TensorRT's too).

`TOPS_EDGE_SHAPE_PASS=0` turns the pass off in the exporter (`ENABLED` is the default).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ENV = "TOPS_EDGE_SHAPE_PASS"
#: the default when TOPS_EDGE_SHAPE_PASS is unset
ENABLED = True
#: integer tensors longer than this are not tracked as values (shape vectors are short)
MAX_ELEMS = 64
#: Slice ends at or above this run to the end of the axis (torch writes INT64_MAX)
_END = 1 << 62
_INTS = (TensorProto.INT64, TensorProto.INT32)
_NP = {TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_}
#: ops whose output has the shape of their first input
_SAME = {
    "Identity", "Cast", "CastLike", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Sigmoid", "Tanh", "Relu",
    "Erf", "Sin", "Cos", "Not", "Softmax", "LogSoftmax", "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf",
    "Gelu", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus", "Softsign", "Clip", "CumSum",
    "Mish", "Trilu", "ScatterElements", "ScatterND", "LayerNormalization", "RMSNormalization",
    "QuantizeLinear", "DequantizeLinear", "Dropout",
}
#: elementwise ops with numpy broadcasting
_BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
    "And", "Or", "Xor", "Max", "Min", "Sum", "Mean", "Where", "BitShift", "PRelu",
}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"}
#: the shape-computing ops the pass counts (Stats)
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Div", "Mul", "Reshape",
             "ConstantOfShape", "Equal", "Where", "Expand", "Constant")


def enabled() -> bool:
    """TOPS_EDGE_SHAPE_PASS (0/false/off/no: off, anything else: on), else ENABLED."""
    value = os.environ.get(ENV)
    if value is None:
        return ENABLED
    return value.strip().lower() not in ("0", "false", "off", "no")


def applies(part_name: str) -> bool:
    """Whether the exporter runs the pass on this part: the decoder and its segments (`decoder.0`, ...)."""
    return enabled() and (part_name == "decoder" or part_name.startswith("decoder."))


# --- symbolic integers ---------------------------------------------------------------------------
class Dim:
    """An integer polynomial in non-negative dim symbols (names: an input dim's dim_param, or `?N` for
    a fresh unknown). Immutable and hashable; equal polynomials are equal values."""

    __slots__ = ("terms", "_hash")

    def __init__(self, terms):
        acc: dict = {}
        for mono, coeff in terms:
            acc[mono] = acc.get(mono, 0) + coeff
        self.terms = tuple(sorted((m, c) for m, c in acc.items() if c != 0))
        self._hash = hash(self.terms)

    @staticmethod
    def const(c: int) -> "Dim":
        return Dim([((), int(c))])

    @staticmethod
    def sym(name: str) -> "Dim":
        return Dim([((name,), 1)])

    def __eq__(self, other):
        return isinstance(other, Dim) and self.terms == other.terms

    def __hash__(self):
        return self._hash

    def __repr__(self):
        if not self.terms:
            return "0"
        return " + ".join("*".join([str(c)] * (c != 1 or not m) + list(m)) for m, c in self.terms)

    @property
    def is_const(self) -> bool:
        return all(not m for m, _ in self.terms)

    @property
    def value(self) -> int:
        return self.terms[0][1] if self.terms else 0

    def __add__(self, other: "Dim") -> "Dim":
        return Dim(self.terms + other.terms)

    def __neg__(self) -> "Dim":
        return Dim([(m, -c) for m, c in self.terms])

    def __sub__(self, other: "Dim") -> "Dim":
        return self + (-other)

    def __mul__(self, other: "Dim") -> "Dim":
        return Dim([(tuple(sorted(m1 + m2)), c1 * c2) for m1, c1 in self.terms for m2, c2 in other.terms])

    def exact_div(self, other: "Dim") -> "Dim | None":
        """self / other where other is a monomial that divides every term exactly, else None."""
        if len(other.terms) != 1:
            return None
        (om, oc), = other.terms
        out = []
        for m, c in self.terms:
            rest = list(m)
            for s in om:
                if s not in rest:
                    return None
                rest.remove(s)
            if c % oc:
                return None
            out.append((tuple(rest), c // oc))
        return Dim(out)

    @property
    def nonneg(self) -> bool:
        """Provably >= 0 (all symbols are)."""
        return all(c >= 0 for _, c in self.terms)

    def positive(self, symbols) -> bool:
        """Provably > 0: non-negative terms, one of them a positive coefficient of symbols in `symbols`."""
        return self.nonneg and any(c > 0 and all(s in symbols for s in m) for m, c in self.terms)


ONE, ZERO = Dim.const(1), Dim.const(0)


def _prod(dims) -> Dim:
    out = ONE
    for d in dims:
        out = out * d
    return out


@dataclass(frozen=True)
class Value:
    """A small integer (or bool) tensor's symbolic value: 0-D (`scalar`) or 1-D."""

    dtype: int
    scalar: bool
    elems: tuple  # Dim for integer dtypes, bool for BOOL

    @property
    def known(self) -> bool:
        """Every element is a number."""
        return all(isinstance(e, bool) or e.is_const for e in self.elems)

    def array(self) -> np.ndarray:
        nums = [e if isinstance(e, bool) else e.value for e in self.elems]
        arr = np.array(nums, dtype=_NP[self.dtype])
        return arr.reshape(()) if self.scalar else arr


# --- analysis ------------------------------------------------------------------------------------
class Analysis:
    """Symbolic shapes (`shapes[name]`: tuple of Dim, absent = rank unknown) and values
    (`values[name]`) of a graph's tensors, in one pass over its (topologically ordered) nodes."""

    def __init__(self, graph: onnx.GraphProto, opset: int, positive=frozenset()):
        self.opset = opset
        self.positive = set(positive)
        self.shapes: dict[str, tuple] = {}
        self.values: dict[str, Value] = {}
        self._fresh = 0
        for vi in graph.input:
            self._declare(vi)
        inputs = {vi.name for vi in graph.input}
        for t in graph.initializer:
            if t.name not in inputs:  # an initializer listed as an input is a default the caller may override
                self._constant(t.name, t)
        for node in graph.node:
            try:
                self._node(node)
            except Exception:  # a rule that does not fit this node (a malformed attribute...): unknown
                for out in node.output:
                    self.shapes.pop(out, None)
                    self.values.pop(out, None)

    def fresh(self) -> Dim:
        self._fresh += 1
        return Dim.sym(f"?{self._fresh}")

    def _declare(self, vi) -> None:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            return
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(Dim.const(d.dim_value))
            elif d.dim_param:
                dims.append(Dim.sym(d.dim_param))
            else:
                dims.append(self.fresh())
        self.shapes[vi.name] = tuple(dims)

    def _constant(self, name: str, t: TensorProto) -> None:
        self.shapes[name] = tuple(Dim.const(d) for d in t.dims)
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if (t.data_type in (*_INTS, TensorProto.BOOL) and len(t.dims) <= 1 and n <= MAX_ELEMS
                and t.data_location != TensorProto.EXTERNAL):
            arr = numpy_helper.to_array(t).ravel()
            elems = tuple(bool(x) for x in arr) if t.data_type == TensorProto.BOOL else tuple(Dim.const(int(x)) for x in arr)
            self.values[name] = Value(t.data_type, len(t.dims) == 0, elems)

    # helpers
    def shape(self, name: str):
        return self.shapes.get(name) if name else None

    def value(self, name: str):
        return self.values.get(name) if name else None

    def ints(self, name: str):
        """The input's value as Python ints (a known constant), else None."""
        v = self.value(name)
        if v is None or not v.known or v.dtype not in _INTS:
            return None
        return [e.value for e in v.elems]

    def broadcast(self, shapes) -> tuple | None:
        if any(s is None for s in shapes):
            return None
        rank = max(len(s) for s in shapes)
        out = []
        for k in range(rank):
            dims = {s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0}
            dims.discard(ONE)
            out.append(ONE if not dims else dims.pop() if len(dims) == 1 else self.fresh())
        return tuple(out)

    def _node(self, node) -> None:
        if node.domain not in ("", "ai.onnx"):
            return
        op = node.op_type
        attrs = {a.name: a for a in node.attribute}
        ins = list(node.input)
        outs = list(node.output)
        get = lambda key, default=None: helper.get_attribute_value(attrs[key]) if key in attrs else default  # noqa: E731
        s = [self.shape(i) for i in ins]
        out_shape = None
        if op == "Constant":
            if "value" in attrs:
                self._constant(outs[0], attrs["value"].t)
            elif "value_int" in attrs:
                self._constant(outs[0], numpy_helper.from_array(np.array(get("value_int"), np.int64)))
            elif "value_ints" in attrs:
                self._constant(outs[0], numpy_helper.from_array(np.array(get("value_ints"), np.int64)))
            elif "value_float" in attrs:
                self.shapes[outs[0]] = ()
            elif "value_floats" in attrs:
                self.shapes[outs[0]] = (Dim.const(len(get("value_floats"))),)
            return
        if op in _SAME:
            out_shape = s[0]
        elif op in _BROADCAST:
            out_shape = self.broadcast(s)
        elif op == "MatMul":
            out_shape = self._matmul(s[0], s[1])
        elif op == "Transpose":
            if s[0] is not None:
                perm = get("perm") or list(range(len(s[0])))[::-1]
                out_shape = tuple(s[0][p] for p in perm)
        elif op == "Reshape":
            out_shape = self._reshape(s[0], self.value(ins[1]), s[1], get("allowzero", 0))
        elif op == "Shape":
            if s[0] is not None:
                rank = len(s[0])
                start, end = get("start", 0), get("end", rank)
                dims = s[0][slice(*(max(0, min(rank, x + rank if x < 0 else x)) for x in (start, end)))]
                out_shape = (Dim.const(len(dims)),)
                self.values[outs[0]] = Value(TensorProto.INT64, False, dims)
            else:
                out_shape = (self.fresh(),)
        elif op == "Size":
            out_shape = ()
            if s[0] is not None:
                self.values[outs[0]] = Value(TensorProto.INT64, True, (_prod(s[0]),))
        elif op == "Gather":
            out_shape = self._gather(node, s, get("axis", 0))
        elif op in ("Unsqueeze", "Squeeze"):
            out_shape = self._squeeze(op, ins, s, get("axes"))
        elif op == "Concat":
            out_shape = self._concat(ins, s, get("axis"))
        elif op == "Slice":
            out_shape = self._slice(ins, s)
        elif op == "Expand":
            v = self.value(ins[1])
            if v is not None and s[0] is not None and v.dtype in _INTS:
                out_shape = self.broadcast([s[0], v.elems])
        elif op == "ConstantOfShape":
            v = self.value(ins[0])
            if v is not None and v.dtype in _INTS:
                out_shape = v.elems
                fill = attrs["value"].t if "value" in attrs else None
                if (fill is not None and fill.data_type in (*_INTS, TensorProto.BOOL) and len(v.elems) == 1
                        and v.known and v.elems[0].value <= MAX_ELEMS):
                    x = numpy_helper.to_array(fill).ravel()[0]
                    e = bool(x) if fill.data_type == TensorProto.BOOL else Dim.const(int(x))
                    self.values[outs[0]] = Value(fill.data_type, False, (e,) * v.elems[0].value)
            elif s[0] is not None and len(s[0]) == 1 and s[0][0].is_const:
                out_shape = tuple(self.fresh() for _ in range(s[0][0].value))
        elif op == "Range":
            out_shape = self._range(ins)
        elif op in _REDUCE:
            out_shape = self._reduce(op, ins, s, get)
        elif op in ("ArgMax", "ArgMin"):
            if s[0] is not None:
                axis = get("axis", 0) % len(s[0])
                keep = get("keepdims", 1)
                out_shape = tuple(ONE if k == axis else d for k, d in enumerate(s[0]) if keep or k != axis)
        elif op == "Split":
            self._split(node, ins, s, get)
            return
        elif op == "Tile":
            reps = self.value(ins[1])
            if s[0] is not None and reps is not None and len(reps.elems) == len(s[0]):
                out_shape = tuple(d * r for d, r in zip(s[0], reps.elems))
        elif op == "GatherElements":
            out_shape = s[1]
        if out_shape is not None:
            self.shapes[outs[0]] = tuple(out_shape)
        if op in ("Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity", "Reshape", "Add", "Sub", "Mul",
                  "Div", "Neg", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Where", "Max", "Min",
                  "Slice", "Not"):
            v = self._value(op, node, ins, get)
            if v is not None:
                self.values[outs[0]] = v

    # shape rules
    def _matmul(self, a, b):
        if a is None or b is None:
            return None
        if len(a) == 1 and len(b) == 1:
            return ()
        if len(a) == 1:
            return b[:-2] + b[-1:]
        if len(b) == 1:
            return a[:-1]
        batch = self.broadcast([a[:-2], b[:-2]])
        return batch + (a[-2], b[-1])

    def _reshape(self, data, v, vshape, allowzero):
        if v is None or v.dtype not in _INTS:
            if vshape is not None and len(vshape) == 1 and vshape[0].is_const:
                return tuple(self.fresh() for _ in range(vshape[0].value))
            return None
        out, infer = [], None
        for k, e in enumerate(v.elems):
            if e.is_const:
                c = e.value
                if c == -1 and infer is None:
                    infer = k
                    out.append(None)
                elif c == 0 and not allowzero:
                    out.append(data[k] if data is not None and k < len(data) else self.fresh())
                elif c >= 0:
                    out.append(e)
                else:
                    return None
            elif data is not None and k < len(data) and e == data[k]:
                out.append(e)  # 0 at run time copies data[k], which is e
            elif e.positive(self.positive) or (allowzero and e.nonneg):
                out.append(e)
            else:
                out.append(self.fresh())
        if infer is not None:
            q = None
            if data is not None:
                q = _prod(data).exact_div(_prod(d for d in out if d is not None))
            out[infer] = q if q is not None else self.fresh()
        return tuple(out)

    def _gather(self, node, s, axis):
        data, idx = s[0], s[1]
        if data is None or idx is None:
            return None
        axis %= len(data)
        return data[:axis] + idx + data[axis + 1:]

    def _axes(self, ins, attr_axes, k=1):
        if attr_axes is not None:
            return list(attr_axes)
        if len(ins) > k and ins[k]:
            return self.ints(ins[k])
        return []

    def _squeeze(self, op, ins, s, attr_axes):
        axes = self._axes(ins, attr_axes)
        if s[0] is None or axes is None:
            return None
        if op == "Unsqueeze":
            rank = len(s[0]) + len(axes)
            axes = sorted(a % rank for a in axes)
            out = list(s[0])
            for a in axes:
                out.insert(a, ONE)
            return tuple(out)
        rank = len(s[0])
        if not axes:
            if not all(d.is_const for d in s[0]):
                return None
            return tuple(d for d in s[0] if d != ONE)
        axes = {a % rank for a in axes}
        return tuple(d for k, d in enumerate(s[0]) if k not in axes)

    def _concat(self, ins, s, axis):
        if any(x is None for x in s) or axis is None:
            return None
        rank = len(s[0])
        axis %= rank
        out = list(s[0])  # the other dims are equal in every input of a valid Concat
        out[axis] = sum((x[axis] for x in s[1:]), s[0][axis])
        return tuple(out)

    def _slice(self, ins, s):
        data = s[0]
        if data is None:
            return None
        starts, ends = self.value(ins[1]), self.value(ins[2])
        n = len(starts.elems) if starts is not None else len(ends.elems) if ends is not None else None
        axes = self.ints(ins[3]) if len(ins) > 3 and ins[3] else (list(range(n)) if n is not None else None)
        steps = self.ints(ins[4]) if len(ins) > 4 and ins[4] else ([1] * len(axes) if axes is not None else None)
        if axes is None:
            return tuple(self.fresh() for _ in data)
        out = list(data)
        if starts is None or ends is None or steps is None:
            for axis in axes:
                out[axis % len(data)] = self.fresh()
            return tuple(out)
        for start, end, axis, step in zip(starts.elems, ends.elems, axes, steps):
            axis %= len(data)
            out[axis] = self._slice_len(data[axis], start, end, step)
        return tuple(out)

    def _slice_len(self, dim, start, end, step):
        """The length of dim[start:end] (step 1), where the bounds can be proven in [0, dim]."""
        if dim.is_const and start.is_const and end.is_const:
            return Dim.const(len(range(*slice(start.value, end.value, step).indices(dim.value))))
        if step != 1 or not start.nonneg or not end.nonneg:
            return self.fresh()
        if (end.is_const and end.value >= _END) or (end - dim).nonneg:
            end = dim  # runs to the end
        elif not (dim - end).nonneg:
            return self.fresh()
        if not (dim - start).nonneg or not (end - start).nonneg:
            return self.fresh()
        return end - start

    def _range(self, ins):
        start, limit, delta = (self.value(i) for i in ins[:3])
        if start is None or limit is None or delta is None:
            return (self.fresh(),)
        a, b, d = start.elems[0], limit.elems[0], delta.elems[0]
        if a.is_const and b.is_const and d.is_const and d.value:
            return (Dim.const(max(0, -(-(b.value - a.value) // d.value))),)
        if d == ONE and (b - a).nonneg:
            return (b - a,)
        return (self.fresh(),)

    def _reduce(self, op, ins, s, get):
        if s[0] is None:
            return None
        axes = get("axes")
        if axes is None:
            axes = self.ints(ins[1]) if len(ins) > 1 and ins[1] else []
        if axes is None:
            return None
        rank = len(s[0])
        if not axes:
            if get("noop_with_empty_axes", 0):
                return s[0]
            axes = list(range(rank))
        axes = {a % rank for a in axes}
        keep = get("keepdims", 1)
        return tuple(ONE if k in axes else d for k, d in enumerate(s[0]) if keep or k not in axes)

    def _split(self, node, ins, s, get):
        if s[0] is None:
            return
        axis = get("axis", 0) % len(s[0])
        sizes = get("split")
        if sizes is None and len(ins) > 1 and ins[1]:
            sizes = self.ints(ins[1])
        n = len(node.output)
        dim = s[0][axis]
        if sizes is None and dim.is_const and dim.value % n == 0 and get("num_outputs", n) == n:
            sizes = [dim.value // n] * n
        for k, out in enumerate(node.output):
            size = Dim.const(sizes[k]) if sizes is not None and len(sizes) == n else self.fresh()
            self.shapes[out] = s[0][:axis] + (size,) + s[0][axis + 1:]

    # value rules
    def _value(self, op, node, ins, get):
        vals = [self.value(i) for i in ins]
        v0 = vals[0] if vals else None
        if op in ("Identity",):
            return v0
        if op == "Cast":
            to = get("to")
            if v0 is None:
                return None
            if to in _INTS and v0.dtype in _INTS:
                if to == TensorProto.INT32 and any(e.is_const and abs(e.value) >= 1 << 31 for e in v0.elems):
                    return None
                return Value(to, v0.scalar, v0.elems)
            if to == TensorProto.BOOL and v0.known:
                return Value(to, v0.scalar, tuple(bool(e) if isinstance(e, bool) else e.value != 0 for e in v0.elems))
            return None
        if op == "Gather":
            idx = self.ints(ins[1])
            iv = vals[1]
            if v0 is None or v0.scalar or idx is None or get("axis", 0) != 0:
                return None
            n = len(v0.elems)
            if any(not -n <= i < n for i in idx):
                return None
            return Value(v0.dtype, iv.scalar, tuple(v0.elems[i] for i in idx))
        if op == "Unsqueeze":
            axes = self._axes(ins, get("axes"))
            if v0 is None or not v0.scalar or axes not in ([0], [-1]):
                return None
            return Value(v0.dtype, False, v0.elems)
        if op == "Squeeze":
            axes = self._axes(ins, get("axes"))
            if v0 is None or v0.scalar or len(v0.elems) != 1 or axes is None or any(a not in (0, -1) for a in axes):
                return None
            return Value(v0.dtype, True, v0.elems)
        if op == "Concat":
            if any(v is None or v.scalar for v in vals) or get("axis") not in (0, -1):
                return None
            return Value(v0.dtype, False, tuple(e for v in vals for e in v.elems))
        if op == "Reshape":
            target = self.ints(ins[1])
            if v0 is None or target is None or len(target) > 1:
                return None
            if not target and len(v0.elems) == 1:
                return Value(v0.dtype, True, v0.elems)
            if len(target) == 1 and target[0] in (-1, len(v0.elems)):
                return Value(v0.dtype, False, v0.elems)
            return None
        if op == "Slice":
            starts, ends = self.ints(ins[1]), self.ints(ins[2])
            axes = self.ints(ins[3]) if len(ins) > 3 and ins[3] else [0]
            steps = self.ints(ins[4]) if len(ins) > 4 and ins[4] else [1]
            if v0 is None or v0.scalar or starts is None or ends is None or axes not in ([0], [-1]) or steps != [1]:
                return None
            return Value(v0.dtype, False, tuple(v0.elems[slice(starts[0], ends[0], steps[0])]))
        if op == "Where":
            if any(v is None for v in vals) or vals[0].dtype != TensorProto.BOOL or vals[1].dtype != vals[2].dtype:
                return None
            if not all(isinstance(c, bool) for c in vals[0].elems):
                return None
            n = self._bcast_len(vals)
            if n is None:
                return None
            c, x, y = (self._stretch(v, n) for v in vals)
            return Value(vals[1].dtype, all(v.scalar for v in vals), tuple(a if k else b for k, a, b in zip(c, x, y)))
        if any(v is None for v in vals) or len(vals) not in (1, 2):
            return None
        if op == "Not":
            if v0.dtype != TensorProto.BOOL:
                return None
            return Value(v0.dtype, v0.scalar, tuple(not e for e in v0.elems))
        if any(v.dtype not in _INTS for v in vals):
            return None
        n = self._bcast_len(vals)
        if n is None:
            return None
        scalar = all(v.scalar for v in vals)
        if op == "Neg":
            return Value(v0.dtype, v0.scalar, tuple(-e for e in v0.elems))
        a, b = (self._stretch(v, n) for v in vals)
        if op in ("Add", "Sub", "Mul"):
            f = {"Add": Dim.__add__, "Sub": Dim.__sub__, "Mul": Dim.__mul__}[op]
            out = tuple(f(x, y) for x, y in zip(a, b))
            bits = 31 if v0.dtype == TensorProto.INT32 else 63
            if any(e.is_const and not -(1 << bits) <= e.value < 1 << bits for e in out):
                return None  # the graph's integers wrap around; these do not
            return Value(v0.dtype, scalar, out)
        if op == "Div":
            out = []
            for x, y in zip(a, b):
                if x.is_const and y.is_const and y.value:
                    q = abs(x.value) // abs(y.value)
                    out.append(Dim.const(q if (x.value < 0) == (y.value < 0) else -q))  # truncates, like C
                else:
                    q = x.exact_div(y) if y.nonneg and y != ZERO else None
                    if q is None:
                        return None
                    out.append(q)
            return Value(v0.dtype, scalar, tuple(out))
        if op in ("Max", "Min"):
            out = []
            for x, y in zip(a, b):
                if (x - y).nonneg:
                    out.append(x if op == "Max" else y)
                elif (y - x).nonneg:
                    out.append(y if op == "Max" else x)
                else:
                    return None
            return Value(v0.dtype, scalar, tuple(out))
        # comparisons: decided only where the difference has a provable sign
        out = []
        for x, y in zip(a, b):
            d = x - y
            if d.is_const:
                c = d.value
                r = {"Equal": c == 0, "Less": c < 0, "Greater": c > 0, "LessOrEqual": c <= 0, "GreaterOrEqual": c >= 0}[op]
            elif op == "Equal" and (d.positive(()) or (-d).positive(())):
                r = False
            elif op in ("Greater", "LessOrEqual") and (d - ONE).nonneg:  # x - y >= 1
                r = op == "Greater"
            elif op in ("Less", "GreaterOrEqual") and d.nonneg:
                r = op == "GreaterOrEqual"
            else:
                return None
            out.append(r)
        return Value(TensorProto.BOOL, scalar, tuple(out))

    @staticmethod
    def _bcast_len(vals):
        lens = {len(v.elems) for v in vals} - {1}
        if len(lens) > 1:
            return None
        return lens.pop() if lens else 1

    @staticmethod
    def _stretch(v, n):
        return v.elems * n if len(v.elems) == 1 else v.elems


# --- the pass ------------------------------------------------------------------------------------
@dataclass
class Stats:
    """What the pass did: node counts before/after, and the rewrites by kind."""

    nodes_before: int = 0
    nodes_after: int = 0
    reshapes: int = 0  # Reshape shapes rewritten (constant or fewer dynamic entries)
    expands: int = 0
    constants: int = 0  # node inputs replaced by a constant
    shape_ops_before: int = 0
    shape_ops_after: int = 0

    def __str__(self):
        return (f"nodes {self.nodes_before} -> {self.nodes_after} (shape ops {self.shape_ops_before} -> "
                f"{self.shape_ops_after}): {self.reshapes} Reshape and {self.expands} Expand shapes, "
                f"{self.constants} inputs made constant or shared")


def count_shape_ops(graph: onnx.GraphProto) -> int:
    return sum(n.op_type in SHAPE_OPS for n in graph.node)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)


def _proven_positive(graph, analysis: Analysis) -> set[str]:
    """Symbols that a Reshape with -1 requires to be non-zero (the other output dims must multiply to
    a non-zero size): those of its entries that are one positive monomial and are that output dim,
    i.e. equal the data's dim (an entry of 0 copies it) or allowzero=1 (where 0 with -1 is invalid).
    Facts of `analysis`, which is sound on its own."""
    found = set()
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        v, data = analysis.value(node.input[1]), analysis.shape(node.input[0])
        if v is None or v.dtype not in _INTS or Dim.const(-1) not in v.elems:
            continue
        for k, e in enumerate(v.elems):
            if e.is_const or len(e.terms) != 1:
                continue
            if not allowzero and (data is None or k >= len(data) or e != data[k]):
                continue
            (mono, coeff), = e.terms
            if coeff > 0:
                found.update(s for s in mono if not s.startswith("?"))
    return found


def analyse(model: onnx.ModelProto, rounds: int = 3) -> Analysis:
    """The graph's symbolic shapes and values, with the positivity the graph itself proves."""
    opset = _opset(model)
    positive: set[str] = set()
    analysis = Analysis(model.graph, opset)
    for _ in range(rounds):
        more = _proven_positive(model.graph, analysis) | positive
        if more == positive:
            break
        positive = more
        analysis = Analysis(model.graph, opset, positive)
    return analysis


class _Rewriter:
    """Rewrites the graph from one Analysis: Reshape/Expand shapes, then every input whose value is
    known (a constant) or a polynomial in named input dims (computed once per graph, from the graph
    inputs' Shape), then drops what nobody reads."""

    def __init__(self, model: onnx.ModelProto, analysis: Analysis):
        self.model, self.graph, self.a = model, model.graph, analysis
        self.opset = _opset(model)
        self.taken = {t.name for t in self.graph.initializer} | {i.name for i in self.graph.input}
        self.taken |= {o for n in self.graph.node for o in n.output}
        self.made: dict = {}  # (dtype, scalar, elems) -> the tensor that holds that value
        self.new_inits: list = []
        self.front: list = []  # new nodes reading only graph inputs and constants: go first
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.sources = {}  # dim_param -> (graph input, axis) it is read from
        for vi in self.graph.input:
            for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                if d.dim_param and not d.HasField("dim_value"):
                    self.sources.setdefault(d.dim_param, (vi.name, axis))
        self.stats = Stats()

    def unique(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def node(self, op: str, inputs: list, **attrs) -> str:
        out = self.unique(f"shape_pass/{op}")
        self.front.append(helper.make_node(op, inputs, [out], name=self.unique(f"shape_pass/{op}_node"), **attrs))
        return out

    def constant(self, dtype: int, scalar: bool, nums) -> str:
        key = (dtype, scalar, tuple(Dim.const(n) for n in nums))
        if key not in self.made:
            arr = np.array(nums, dtype=_NP[dtype])
            arr = arr.reshape(()) if scalar else arr
            name = self.unique("shape_pass/const")
            self.new_inits.append(numpy_helper.from_array(arr, name))
            self.made[key] = name
        return self.made[key]

    def tensor(self, dtype: int, scalar: bool, elems) -> str | None:
        """A tensor holding exactly `elems` (ints or Dims): a constant, or computed at the top of the
        graph from the inputs' shapes; None where an element has a fresh symbol."""
        elems = tuple(e if isinstance(e, Dim) else Dim.const(e) for e in elems)
        key = (dtype, scalar, elems)
        if key in self.made:
            return self.made[key]
        if all(e.is_const for e in elems):
            return self.constant(dtype, scalar, [e.value for e in elems])
        if dtype not in _INTS or (scalar and len(elems) != 1):
            return None
        parts, run = [], []
        for e in elems:
            if e.is_const:
                run.append(e.value)
                continue
            piece = self._poly(e)
            if piece is None:
                return None
            if run:
                parts.append(self.constant(TensorProto.INT64, False, run))
                run = []
            parts.append(piece)
        if run:
            parts.append(self.constant(TensorProto.INT64, False, run))
        out = parts[0] if len(parts) == 1 else self.node("Concat", parts, axis=0)
        if dtype != TensorProto.INT64:
            out = self.node("Cast", [out], to=dtype)
        if scalar:
            if self.opset >= 13:
                out = self.node("Squeeze", [out, self.constant(TensorProto.INT64, False, [0])])
            else:
                out = self.node("Squeeze", [out], axes=[0])
        self.made[key] = out
        return out

    def _poly(self, e: Dim) -> str | None:
        """1-D int64 [e] for a polynomial in named dims (memoized)."""
        key = (TensorProto.INT64, False, (e,))
        if key in self.made:
            return self.made[key]
        if any(s not in self.sources for m, _ in e.terms for s in m):
            return None
        total = None
        for mono, coeff in e.terms:
            term = None
            for sym in mono:
                src, axis = self.sources[sym]
                key1 = (TensorProto.INT64, False, (Dim.sym(sym),))
                if key1 not in self.made:
                    shape = self.made.get(("shape", src)) or self.node("Shape", [src])
                    self.made[("shape", src)] = shape
                    self.made[key1] = self.node("Gather", [shape, self.constant(TensorProto.INT64, False, [axis])], axis=0)
                term = self.made[key1] if term is None else self.node("Mul", [term, self.made[key1]])
            if term is None:
                term = self.constant(TensorProto.INT64, False, [coeff])
            elif coeff != 1:
                term = self.node("Mul", [term, self.constant(TensorProto.INT64, False, [coeff])])
            total = term if total is None else self.node("Add", [total, term])
        self.made[key] = total
        return total

    def _pieces(self, shape_input: str):
        """The shape input's elements, each a single-element 1-D input of the Concat that computes
        it, else None (the fallback for dims with no named source)."""
        node = self.producer.get(shape_input)
        if node is None or node.op_type != "Concat":
            return None
        pieces = []
        for i in node.input:
            v = self.a.value(i)
            if v is None or v.scalar:
                return None
            pieces.extend([i] if len(v.elems) == 1 else [None] * len(v.elems))
        return pieces

    def shape_input(self, node, index: int, new: list, dtype: int) -> bool:
        """Replace node.input[index] (a 1-D shape) by `new`: ints, or Dims still dynamic. Returns
        whether it changed."""
        name = self.tensor(dtype, False, new)
        if name is None:  # a fresh dim: keep the original Concat's inputs for those entries
            pieces = self._pieces(node.input[index])
            if pieces is None or len(pieces) != len(new):
                return False
            inputs, run = [], []
            for k, e in enumerate(new):
                if isinstance(e, int):
                    run.append(e)
                    continue
                if pieces[k] is None:
                    return False
                if run:
                    inputs.append(self.constant(dtype, False, run))
                    run = []
                inputs.append(self.tensor(dtype, False, [e]) or pieces[k])
            if run:
                inputs.append(self.constant(dtype, False, run))
            name = self.unique(node.input[index] + "/shape_pass")
            self.inserts.append((self._at, helper.make_node("Concat", inputs, [name], axis=0,
                                                            name=self.unique(name + "_node"))))
        node.input[index] = name
        return True

    def run(self) -> Stats:
        g = self.graph
        before = self.stats.nodes_before = len(g.node)
        self.stats.shape_ops_before = count_shape_ops(g)
        saved = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node]  # nodes hold no weights
        self.inserts: list = []  # (index of the node to go before, new node)
        for self._at, node in enumerate(g.node):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Reshape" and len(node.input) > 1:
                self.stats.reshapes += self._reshape(node)
            elif node.op_type == "Expand":
                self.stats.expands += self._expand(node)
        self._inputs()
        at: dict = {}
        for k, new in self.inserts:
            at.setdefault(k, []).append(new)
        nodes = list(self.front)
        for k, node in enumerate(g.node):
            nodes.extend(at.get(k, ()))
            nodes.append(node)
        kept, read = _live_nodes(nodes, g)
        del g.node[:]
        if len(kept) >= before:  # nothing gained: the graph as it was
            g.node.extend(saved)
            self.stats = Stats(nodes_before=before, nodes_after=before, shape_ops_before=self.stats.shape_ops_before,
                               shape_ops_after=self.stats.shape_ops_before)
            return self.stats
        g.node.extend(kept)
        # the new constants that are read; the original's small constants that only the rewritten
        # shape computations read go (ORT warns about unused initializers); weights and anything
        # external stay, read or not. Deleted in place: no tensor is copied.
        read_before = {i for n in saved for i in n.input}
        drop = [k for k, t in enumerate(g.initializer) if t.name not in read and t.name in read_before
                and t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) <= MAX_ELEMS]
        for k in reversed(drop):
            del g.initializer[k]
        g.initializer.extend(t for t in self.new_inits if t.name in read)
        produced = {o for n in g.node for o in n.output}
        stale = [k for k, v in enumerate(g.value_info) if v.name not in produced]
        for k in reversed(stale):
            del g.value_info[k]
        self.stats.nodes_after = len(g.node)
        self.stats.shape_ops_after = count_shape_ops(g)
        return self.stats

    def _computed(self, name: str) -> bool:
        node = self.producer.get(name)
        return node is not None and node.op_type != "Constant"

    def _reshape(self, node) -> int:
        """Entries equal to the data's dim become 0, one unknown entry -1 where the others are
        provably non-zero. A Reshape with allowzero=1 (the dynamo exporter's) is rewritten only where
        no entry can be 0 at run time (no constant 0, the unknown entries provably positive): it then
        means the same with allowzero=0."""
        allowzero = next((a for a in node.attribute if a.name == "allowzero" and a.i), None)
        v, data = self.a.value(node.input[1]), self.a.shape(node.input[0])
        if v is None or v.scalar or v.dtype not in _INTS or not self._computed(node.input[1]):
            return 0
        if allowzero is not None and ZERO in v.elems:
            return 0
        new: list = []
        for k, e in enumerate(v.elems):
            if e.is_const:
                new.append(e.value)
            elif data is not None and k < len(data) and e == data[k]:
                new.append(0)  # allowzero=0: copy data[k], which is e
            else:
                new.append(e)
        dynamic = [k for k, e in enumerate(new) if not isinstance(e, int)]
        if len(dynamic) == 1 and -1 not in new and data is not None:
            if all(e > 0 or (e == 0 and k < len(data) and data[k].positive(self.a.positive))
                   for k, e in enumerate(new) if k != dynamic[0]):
                new[dynamic[0]] = -1  # the one unknown dim is what the others leave of the size
        if allowzero is not None and not all(isinstance(e, int) or e.positive(self.a.positive) for e in new):
            return 0
        if sum(not isinstance(e, int) for e in new) == sum(not e.is_const for e in v.elems) and not v.known:
            return 0  # no entry gained
        if not self.shape_input(node, 1, new, v.dtype):
            return 0
        if allowzero is not None:
            allowzero.i = 0
        return 1

    def _expand(self, node) -> int:
        v, data = self.a.value(node.input[1]), self.a.shape(node.input[0])
        if v is None or v.scalar or v.dtype not in _INTS or data is None or not self._computed(node.input[1]):
            return 0
        new: list = []
        offset = len(v.elems) - len(data)
        for k, e in enumerate(v.elems):
            if e.is_const:
                new.append(e.value)
            elif k - offset >= 0 and e == data[k - offset]:
                new.append(1)  # broadcast(d, d) = broadcast(d, 1) = d
            else:
                new.append(e)
        if sum(not isinstance(e, int) for e in new) == sum(not e.is_const for e in v.elems):
            return 0  # no entry gained
        return int(self.shape_input(node, 1, new, v.dtype))

    def _inputs(self) -> None:
        """Inputs computed by nodes whose value is known: read a constant instead. Inputs whose value
        is a polynomial in named dims: read the one tensor per graph that computes it, where that is
        shared (it exists already, or several differently computed inputs hold that value). Only
        for nodes whose own output is no tracked value: those inside a shape computation go with it."""
        outputs = {o.name for o in self.graph.output}
        dynamic: dict = {}  # value key -> [(node, input index)]
        for node in self.graph.node:
            if node.op_type == "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            if all(o in self.a.values and o not in outputs for o in node.output):
                continue
            for k, name in enumerate(node.input):
                v = self.a.value(name)
                if v is None or not self._computed(name):
                    continue
                if v.known:
                    node.input[k] = self.constant(v.dtype, v.scalar, v.array().ravel().tolist())
                    self.stats.constants += 1
                elif v.dtype in _INTS:
                    dynamic.setdefault((v.dtype, v.scalar, v.elems), []).append((node, k))
        best, todo, progress = self._live(), dict(dynamic), True
        while todo and progress:  # each kept only where it leaves fewer nodes to run; again after one was
            progress = False
            for key, uses in list(todo.items()):
                mark = (len(self.front), len(self.new_inits), set(self.made))
                before = [node.input[k] for node, k in uses]
                new = self.tensor(*key)
                if new is None:
                    del todo[key]
                    continue
                for node, k in uses:
                    node.input[k] = new
                live = self._live()
                if live < best:
                    best, progress = live, True
                    self.stats.constants += sum(b != new for b in before)
                    del todo[key]
                    continue
                for (node, k), name in zip(uses, before):
                    node.input[k] = name
                del self.front[mark[0]:]
                del self.new_inits[mark[1]:]
                for made in set(self.made) - mark[2]:
                    del self.made[made]

    def _live(self) -> int:
        """How many nodes (the graph's, the new ones) the graph outputs need."""
        nodes = [*self.front, *(n for _, n in self.inserts), *self.graph.node]
        producer = {o: n for n in nodes for o in n.output}
        todo = [o.name for o in self.graph.output]
        seen: set = set()
        while todo:
            node = producer.get(todo.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            todo.extend(node.input)
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    todo.extend(_subgraph_reads(sub))
        return len(seen)


def _live_nodes(nodes: list, graph: onnx.GraphProto) -> tuple[list, set]:
    """The nodes (in order) some output of which the graph's outputs need (read by a node, a
    subgraph or the graph), and every name those nodes read."""
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(node.input)
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    live.update(_subgraph_reads(sub))
    kept.reverse()
    return kept, live


def _subgraph_reads(graph: onnx.GraphProto) -> list[str]:
    names = []
    for node in graph.node:
        names.extend(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names.extend(_subgraph_reads(sub))
    return names


def simplify(model: onnx.ModelProto) -> Stats:
    """Runs the pass on `model`'s top graph, in place; weights (external or not) are left as they are."""
    return _Rewriter(model, analyse(model)).run()


def simplify_file(path: Path) -> Stats | None:
    """Rewrites the graph at `path` in place: reads it without its external data and writes the graph
    proto back (tensors in `path.data` stay where they are, referenced as before). A graph the pass
    cannot handle is left as it was, with a warning; returns None then."""
    path = Path(path)
    tmp = path.with_name(path.name + ".shape_pass.tmp")
    try:
        model = onnx.load(str(path), load_external_data=False)
        stats = simplify(model)
        if stats.nodes_after == stats.nodes_before and not (stats.reshapes or stats.expands or stats.constants):
            return stats
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, path)
        return stats
    except Exception as exc:  # the export stays valid without the pass
        tmp.unlink(missing_ok=True)
        warnings.warn(f"shape pass left {path.name} as exported: {type(exc).__name__}: {exc}", stacklevel=2)
        return None
