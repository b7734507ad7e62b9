"""A numpy-like way to write ONNX graphs, on onnxscript's IR (`onnx_ir`, its Tape records the nodes).

The product's own transforms (feature engineering, WoE binning, reason codes) are written as
expressions over `Var`s; each arithmetic operator adds one ONNX node. onnxscript's `@script`
functions turn Python `for` loops into ONNX `Loop` nodes, while a feature catalogue needs them
unrolled at build time (one node per statistic, known when the bundle is built), hence the Tape.

Numbers are float64 throughout, as in numpy: the features are computed in the same order of
operations as `finance.features`, so that they agree bit for bit where the operations are IEEE
exact (+, -, *, /, sqrt, comparisons).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import passes
from onnx_ir.passes import common

OPSET = 18  # core.onnx_export.OPSET: one opset for every graph partners get
ML_OPSET = 3  # ai.onnx.ml: TreeEnsembleRegressor with double thresholds (nodes_values_as_tensor)

_DTYPES = {np.dtype(np.float64): ir.DataType.DOUBLE, np.dtype(np.float32): ir.DataType.FLOAT,
           np.dtype(np.int64): ir.DataType.INT64, np.dtype(np.bool_): ir.DataType.BOOL,
           np.dtype(np.uint8): ir.DataType.UINT8}
_ONNX_TYPES = {"string": onnx.TensorProto.STRING, "double": onnx.TensorProto.DOUBLE,
               "float": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64,
               "bool": onnx.TensorProto.BOOL}


class Var:
    """One value of the graph being built; arithmetic on it adds nodes. Python numbers are float64."""

    def __init__(self, builder: GraphBuilder, value: ir.Value) -> None:
        self.b = builder
        self.value = value

    def _other(self, x: Var | float) -> Var:
        return x if isinstance(x, Var) else self.b.const(np.asarray(x, dtype=np.float64))

    def __add__(self, x): return self.b.op("Add", self, self._other(x))
    def __radd__(self, x): return self.b.op("Add", self._other(x), self)
    def __sub__(self, x): return self.b.op("Sub", self, self._other(x))
    def __rsub__(self, x): return self.b.op("Sub", self._other(x), self)
    def __mul__(self, x): return self.b.op("Mul", self, self._other(x))
    def __rmul__(self, x): return self.b.op("Mul", self._other(x), self)
    def __truediv__(self, x): return self.b.op("Div", self, self._other(x))
    def __rtruediv__(self, x): return self.b.op("Div", self._other(x), self)
    def __neg__(self): return self.b.op("Neg", self)
    def __lt__(self, x): return self.b.op("Less", self, self._other(x))
    def __le__(self, x): return self.b.op("LessOrEqual", self, self._other(x))
    def __gt__(self, x): return self.b.op("Greater", self, self._other(x))
    def __ge__(self, x): return self.b.op("GreaterOrEqual", self, self._other(x))
    def __and__(self, x): return self.b.op("And", self, x)
    def __or__(self, x): return self.b.op("Or", self, x)
    def __invert__(self): return self.b.op("Not", self)

    def eq(self, x: Var | float) -> Var:
        return self.b.op("Equal", self, self._other(x))

    def isnan(self) -> Var:
        return self.b.op("IsNaN", self)

    def as_double(self) -> Var:
        """A boolean or integer as 0.0/1.0 (numpy's bool -> float64)."""
        return self.b.op("Cast", self, to=_ONNX_TYPES["double"])


class GraphBuilder:
    """Collects inputs, nodes, constants and outputs, then writes one ONNX ModelProto."""

    def __init__(self) -> None:
        self.tape = ir.tape.Tape()
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self._constants: dict[tuple, Var] = {}
        self._count = 0
        self._embedded_nodes: list[ir.Node] = []  # of graphs inlined by `embed`
        self._embedded_initializers: list[ir.Value] = []

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def input(self, name: str, dtype: str, shape: Sequence[int | str | None]) -> Var:
        element = ir.DataType.STRING if dtype == "string" else _DTYPES[np.dtype(_np_type(dtype))]
        value = ir.Value(name=name, type=ir.TensorType(element), shape=ir.Shape(shape))
        self.inputs.append(value)
        return Var(self, value)

    def const(self, array: np.ndarray | float | int) -> Var:
        array = np.asarray(array)
        if array.dtype == np.float32 or array.dtype.kind == "f":
            array = array.astype(array.dtype if array.dtype == np.float32 else np.float64)
        elif array.dtype.kind in "iu":
            array = array.astype(np.int64)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:  # one initializer per distinct constant
            value = self.tape.initializer(ir.tensor(np.array(array, order="C")), name=self._name("const"))
            self._constants[key] = Var(self, value)
        return self._constants[key]

    def const_int32(self, array: np.ndarray) -> Var:
        """An int32 constant (const() makes integers int64)."""
        value = self.tape.initializer(ir.tensor(np.array(array, dtype=np.int32, order="C")), name=self._name("const"))
        return Var(self, value)

    def op(self, op_type: str, *inputs: Var | None, domain: str = "", **attributes) -> Var:
        values = [None if v is None else v.value for v in inputs]
        out = self.tape.op(op_type, values, attributes or None, domain=domain)
        out.name = self._name(op_type.lower())
        return Var(self, out)

    def op_multi(self, op_type: str, *inputs: Var, outputs: int, domain: str = "", **attributes) -> list[Var]:
        outs = self.tape.op_multi_out(op_type, [v.value for v in inputs], attributes or None, domain=domain,
                                      num_outputs=outputs)
        for out in outs:
            out.name = self._name(op_type.lower())
        return [Var(self, o) for o in outs]

    # ---------------------------------------------------------------- numpy-like helpers
    def where(self, condition: Var, a: Var | float, b: Var | float) -> Var:
        a = a if isinstance(a, Var) else self.const(np.float64(a))
        b = b if isinstance(b, Var) else self.const(np.float64(b))
        return self.op("Where", condition, a, b)

    def concat(self, parts: Sequence[Var], axis: int) -> Var:
        return parts[0] if len(parts) == 1 else self.op("Concat", *parts, axis=axis)

    def column(self, x: Var, j: int) -> Var:
        """Column j of an (N, C) matrix as (N, 1)."""
        return self.op("Slice", x, self.const(np.array([j])), self.const(np.array([j + 1])), self.const(np.array([1])))

    def columns(self, x: Var, start: int, stop: int) -> Var:
        return self.op("Slice", x, self.const(np.array([start])), self.const(np.array([stop])),
                       self.const(np.array([1])))

    def take(self, x: Var, index: int | Sequence[int], axis: int) -> Var:
        return self.op("Gather", x, self.const(np.asarray(index, dtype=np.int64)), axis=axis)

    def fill_like(self, x: Var, value: float) -> Var:
        """A float64 tensor of x's shape holding `value` everywhere."""
        return self.op("Expand", self.const(np.float64(value)), self.op("Shape", x))

    def maximum(self, a: Var, b: Var) -> Var:
        """Elementwise larger of two NaN-free values (ONNX Max's NaN rule is not numpy's)."""
        return self.where(a > b, a, b)

    def clip(self, x: Var, low: float | None, high: float | None) -> Var:
        """np.clip: NaN stays NaN (comparisons with NaN are false)."""
        if low is not None:
            x = self.where(x < low, low, x)
        if high is not None:
            x = self.where(x > high, high, x)
        return x

    def divide(self, a: Var, b: Var) -> Var:
        """finance.features._div: a / b, NaN where the result is not finite."""
        out = a / b
        bad = self.op("IsInf", out) | out.isnan()
        return self.where(bad, np.nan, out)

    def sequential_sum(self, terms: Sequence[Var]) -> Var:
        """((t0 + t1) + t2) + ...: numpy's order for a sum over a short outer axis."""
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    def embed(self, proto: onnx.ModelProto, inputs: dict[str, Var], *, prefix: str) -> dict[str, Var]:
        """Another model's graph (e.g. a torch.onnx export) inlined into this one: its inputs bound to
        `inputs` (by name), its values renamed `prefix` + name; returns its outputs by name.

        Inlined rather than joined with onnx.compose afterwards, so that the product's own transforms
        can both feed the network and use its outputs (occlusion reasons, ensemble blends) in one builder.
        """
        model = ir.serde.deserialize_model(proto)
        graph = model.graph
        if model.functions or dict(graph.opset_imports) != {"": OPSET}:
            raise ValueError(f"only graphs of opset {OPSET} without local functions can be embedded, got "
                             f"{dict(graph.opset_imports)} and {len(model.functions)} functions")
        if {v.name for v in graph.inputs} != set(inputs):
            raise ValueError(f"the graph's inputs are {[v.name for v in graph.inputs]}, not {sorted(inputs)}")
        outputs = {v.name: v for v in graph.outputs}
        nodes = list(graph)
        for value in graph.inputs:
            value.replace_all_uses_with(inputs[value.name].value)
        graph.outputs.clear()
        graph.remove(nodes)
        initializers = list(graph.initializers.values())
        graph.initializers.clear()
        for value in initializers:
            value.name = prefix + value.name
            self._embedded_initializers.append(value)
        for node in nodes:
            if node.name:
                node.name = prefix + node.name
            for value in node.outputs:
                value.name = prefix + value.name
        self._embedded_nodes += nodes
        return {name: Var(self, value) for name, value in outputs.items()}

    def output(self, var: Var, name: str) -> None:
        identity = self.op("Identity", var)
        identity.value.name = name
        self.outputs.append(identity.value)

    def model(self, *, doc: str = "", metadata: dict[str, str] | None = None,
              extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
        opsets = {"": OPSET, **(extra_opsets or {})}
        graph = ir.Graph(self.inputs, self.outputs, nodes=[*self.tape.nodes, *self._embedded_nodes],
                         initializers=[*self.tape.initializers, *self._embedded_initializers],
                         opset_imports=opsets, name="moeworks_bundle", doc_string=doc or None)
        model = ir.Model(graph, ir_version=9, producer_name="moeworks", metadata_props=dict(metadata or {}))
        passes.Sequential(common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass(),
                          common.TopologicalSortPass())(model)
        proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), strict_mode=True)
        onnx.checker.check_model(proto, full_check=True)
        return proto


def _np_type(name: str) -> type:
    return {"double": np.float64, "float": np.float32, "int64": np.int64, "bool": np.bool_, "uint8": np.uint8}[name]
