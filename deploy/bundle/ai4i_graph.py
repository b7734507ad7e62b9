"""The AI4I 2020 failure model as one ONNX graph, either backend: raw machine readings in,
probabilities of failure and of each failure mode out.

Inputs: `Type` (N, 1) string (L, M or H; anything else codes 0, as `features` does) and the five
readings, (N, 1) float64 each, named as the AI4I file's columns. Outputs: `failure`, `TWF`, `HDF`,
`PWF`, `OSF`, `RNF`, (N, 1) float64 each. The derived features (temperature difference, power,
wear x torque) are computed in the order `manufacturing.maintenance.ai4i.features` computes them.
Backends: `lightgbm` (one tree ensemble per output) or `moe` (the TabularMoE with six logits: the
readings standardised as `moe_inputs`, the type's embedding, the network's forward as the credit
bundles' sparse MoE graph, deploy/bundle/moe_graph.py).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from deploy.bundle.credit_features import BundleError
from deploy.bundle.credit_graph import _leaf_values, _tree_ensemble
from deploy.bundle.graph import GraphBuilder, Var
from deploy.bundle.moe_graph import network_logits
from manufacturing.maintenance.ai4i import NUMERIC_INPUTS, OUTPUTS, TYPE_CODES

BACKENDS = ("lightgbm", "moe")


def _moe_outputs(g: GraphBuilder, numeric: Var, codes: Var, model) -> None:
    """The MoE backend's six probabilities from numeric (N, 8) float32 and codes (N, 1) int64."""
    from finance.models.input_gradients import TabularMoEGradient

    net = model.moe_
    try:
        kernel = TabularMoEGradient.from_module(net.dense_copy(), embedded_inputs=True)  # hashed: dense
    except (TypeError, ValueError) as error:
        raise BundleError(f"the AI4I MoE backend has no bundle graph: {error}") from None
    # (numeric - mean) / std in float64 then float32, as `moe_inputs` (float32 minus the loaded float64 mean)
    z = g.op("Cast", (g.op("Cast", numeric, to=11) - g.const(np.asarray(model.mean_, dtype=np.float64)))
             / g.const(np.asarray(model.std_, dtype=np.float64)), to=1)
    index = g.op("Squeeze", codes, g.const(np.array([1])))  # (N,)
    embedded = [g.op("Gather", g.const(emb.weight.detach().numpy()), index, axis=0) for emb in net.embeddings]
    logits = network_logits(g, g.concat([z, *embedded], axis=1), kernel)  # (N, 6) float32
    probs = g.op("Cast", g.op("Sigmoid", logits), to=11)  # torch.sigmoid in float32, as predict_proba
    for j, name in enumerate(OUTPUTS):
        g.output(g.column(probs, j), name)


def ai4i_graph(model, *, backend: str = "lightgbm", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    if backend not in BACKENDS:
        raise BundleError(f"unknown AI4I backend {backend!r}; expected lightgbm or moe")
    g = GraphBuilder()
    kind = g.input("Type", "string", ["N", 1])
    readings = {name: g.input(name, "double", ["N", 1]) for name in NUMERIC_INPUTS}
    air, process, speed, torque, wear = (readings[n] for n in NUMERIC_INPUTS)
    power_kw = torque * speed * 2.0 * math.pi / 60.0 / 1000.0
    codes = g.op("LabelEncoder", kind, domain="ai.onnx.ml", keys_strings=list(TYPE_CODES),
                 values_int64s=list(TYPE_CODES.values()), default_int64=0)
    columns = [*(readings[n] for n in NUMERIC_INPUTS), process - air, power_kw, wear * torque / 1000.0]
    numeric = g.op("Cast", g.concat(columns, axis=1), to=1)  # float32, as `features` returns
    if backend == "moe":
        _moe_outputs(g, numeric, codes, model)
        return g.model(doc="moeworks AI4I failure model (MoE backend)", metadata=metadata,
                       extra_opsets={"ai.onnx.ml": 5})
    matrix = g.op("Cast", g.concat([numeric, g.op("Cast", codes, to=1)], axis=1), to=11)  # compared as float64
    for name in OUTPUTS:
        booster = model.boosters_[name]
        trees = booster.dump_model()["tree_info"]
        leaves = max(max(i for i, _ in _leaf_values(t["tree_structure"])) for t in trees) + 1
        leaf = g.op("Cast", g.op("TreeEnsemble", matrix, domain="ai.onnx.ml", **_tree_ensemble(trees, leaves)), to=7)
        values = np.zeros(len(trees) * leaves)
        for t, info in enumerate(trees):
            for index, value in _leaf_values(info["tree_structure"]):
                values[t * leaves + index] = value
        raw = g.op("ReduceSum", g.op("Gather", g.const(values), leaf), g.const(np.array([1])), keepdims=1)
        g.output(1.0 / (1.0 + g.op("Exp", -raw)), name)
    return g.model(doc="moeworks AI4I failure model (LightGBM backend)", metadata=metadata,
                   extra_opsets={"ai.onnx.ml": 5})
