"""One ONNX graph for a RUL model (`moeworks maintenance train`, LSTM or MoE): raw cycle rows in, RUL out.

Inputs: one (N, T) float64 tensor per raw C-MAPSS field the model reads (`setting_1..3` and the kept
sensors), named as the field: N engines, T cycles each, oldest first. Engines with fewer than T
cycles are padded at the FRONT with NaN rows (a row whose `setting_1` is NaN is padding); T may
be anything from 1 up, shorter than the window included. Output `rul` (N, 1) float32: remaining
useful life in cycles after each engine's last row, as `RULEstimator.predict` gives it; NaN for an
engine with no rows or with a missing reading among its rows (moeworks refuses those).

The graph computes what `ConditionNormalizer.transform` and `build_windows(last_only=True)` do:
the regime of each cycle (nearest k-means centre of the scaled settings), each sensor standardised
within its regime, the regime one-hot, the cycles run in each regime so far and the running means
of the normalised sensors (the MoE kind's history features, hence the whole history as input, not
only the window), then the last `window` rows, a short engine's first row repeated in front. The
network itself is `core.onnx_export`'s export of the model (`manufacturing.maintenance.export`),
joined to this front end with `onnx.compose`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from deploy.bundle.graph import GraphBuilder, Var
from manufacturing.maintenance.cmapss import SETTINGS
from manufacturing.maintenance.features import HISTORY_SCALE

WINDOW_NAME = "window_features"


def rul_fields(estimator) -> list[str]:
    """The raw fields the graph takes, in C-MAPSS column order."""
    return [*SETTINGS, *estimator.normalizer_.sensors_]


def _front_end(g: GraphBuilder, estimator) -> tuple[Var, Var]:
    """(window (N, window, F) float32, no_rul (N, 1) bool) from the raw field inputs."""
    norm, cfg, window = estimator.normalizer_, estimator.normalizer_.config, estimator.net_.window
    fields = {name: g.input(name, "double", ["N", "T"]) for name in rul_fields(estimator)}
    # window NaN rows in front of every engine: a window always fits, padding marks itself as NaN
    pads = g.const(np.array([0, window, 0, 0]))
    padded = {n: g.op("Pad", v, pads, g.const(np.float64(np.nan))) for n, v in fields.items()}

    def stack(names: list[str]) -> Var:  # (N, T', len(names))
        return g.concat([g.op("Unsqueeze", padded[n], g.const(np.array([2]))) for n in names], axis=2)

    settings, sensors = stack(SETTINGS), stack(list(norm.sensors_))
    valid = ~g.op("Unsqueeze", padded[SETTINGS[0]], g.const(np.array([2]))).isnan()  # (N, T', 1)
    valid_f = valid.as_double()
    scaled = settings / g.const(np.asarray(norm.setting_scale_, dtype=np.float64))
    difference = g.op("Unsqueeze", scaled, g.const(np.array([2]))) - g.const(np.asarray(norm.centers_))  # (N,T',R,3)
    distance = g.op("ReduceSum", difference * difference, g.const(np.array([3])), keepdims=0)  # (N, T', R)
    regime = g.op("ArgMin", distance, axis=2, keepdims=0)  # (N, T'): the first of equals, as numpy
    regime = g.where(g.op("Squeeze", valid, g.const(np.array([2]))), regime, g.const(np.array(0)))
    mean = g.op("Gather", g.const(np.asarray(norm.mean_, dtype=np.float64)), regime, axis=0)  # (N, T', S)
    std = g.op("Gather", g.const(np.asarray(norm.std_, dtype=np.float64)), regime, axis=0)  # inf: a flat sensor
    normalised = (sensors - mean) / std
    parts = [normalised]
    regimes = cfg.num_regimes
    one_hot = g.op("Cast", g.op("Equal", g.op("Unsqueeze", regime, g.const(np.array([2]))),
                                g.const(np.arange(regimes))), to=11) * valid_f  # (N, T', R), 0 on padding
    if regimes > 1 and cfg.regime_features:
        parts.append(one_hot)
    count = g.op("CumSum", valid_f, g.const(np.array(1)))  # cycles so far, this one included
    if cfg.history:
        parts.append(g.op("CumSum", one_hot, g.const(np.array(1))) / HISTORY_SCALE)
    if cfg.running_mean:
        parts.append(g.op("CumSum", g.where(valid, normalised, 0.0), g.const(np.array(1))) / count)
    features = g.op("Cast", g.concat(parts, axis=2), to=1)  # (N, T', F) float32, as transform_arrays
    # rows before an engine's first cycle stand for "no change before the record began": its first row
    cycles = g.op("ReduceSum", valid_f, g.const(np.array([1])), keepdims=1)  # (N, 1, 1)
    total = g.op("Cast", g.op("Shape", valid, start=1, end=2), to=11)  # T'
    # (N, 1, 1) index of the first real row (the last row for an engine without any: its RUL is NaN)
    first = g.op("Cast", total - g.maximum(cycles, g.const(np.float64(1.0))), to=7)
    width = estimator.net_.num_features
    first_row = g.op("GatherElements", features, g.op("Expand", first, g.const(np.array([1, 1, width]))), axis=1)
    features = g.where(valid, features, first_row)
    last = g.op("Slice", features, g.const(np.array([-window])), g.const(np.array([np.iinfo(np.int64).max])),
                g.const(np.array([1])))  # (N, window, F)
    # moeworks refuses a missing reading anywhere in an engine's rows, and so a padding row after its first cycle
    missing = g.op("ReduceMax", (g.concat([settings, sensors], axis=2).isnan() & valid).as_double(),
                   g.const(np.array([1, 2])), keepdims=0)  # (N,)
    steps = g.columns(g.op("Squeeze", valid_f, g.const(np.array([2]))), 1, np.iinfo(np.int64).max) - g.op(
        "Slice", g.op("Squeeze", valid_f, g.const(np.array([2]))), g.const(np.array([0])), g.const(np.array([-1])),
        g.const(np.array([1])))  # (N, T'-1): -1 where a real row is followed by padding
    gap = g.op("ReduceMin", steps, g.const(np.array([1])), keepdims=0) < 0.0
    no_rul = g.op("Squeeze", cycles.eq(0.0), g.const(np.array([1, 2]))) | (missing > 0.0) | gap  # (N,)
    return last, g.op("Unsqueeze", no_rul, g.const(np.array([1])))


def rul_graph(estimator, *, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """The bundle's graph for a loaded `RULEstimator` (see the module docstring)."""
    from manufacturing.maintenance.export import RUL_INPUT, RUL_OUTPUT, export_rul_onnx

    g = GraphBuilder()
    window, no_rul = _front_end(g, estimator)
    g.output(window, WINDOW_NAME)
    g.output(no_rul, "no_rul")
    front = g.model()
    with tempfile.TemporaryDirectory() as folder:
        # the MoE kind's experts sparsely (only the routed ones run; core.sparse_export), an LSTM as it is
        net = onnx.load(str(export_rul_onnx(estimator, Path(folder) / "net.onnx", moe_dispatch="sparse")))
    del net.metadata_props[:]  # the bundle's card replaces the export's own notes
    front.ir_version = net.ir_version = max(front.ir_version, net.ir_version)
    net = onnx.compose.add_prefix(net, "net/")
    joined = onnx.compose.merge_models(front, net, io_map=[(WINDOW_NAME, f"net/{RUL_INPUT}")])
    # rul (N,) -> (N, 1), NaN where the engine has no rows or a missing reading
    graph = joined.graph
    nan = onnx.helper.make_tensor("rul_nan", onnx.TensorProto.FLOAT, [], [np.nan])
    axes = onnx.helper.make_tensor("rul_axes", onnx.TensorProto.INT64, [1], [1])
    graph.initializer.extend([nan, axes])
    graph.node.extend([
        onnx.helper.make_node("Unsqueeze", [f"net/{RUL_OUTPUT}", "rul_axes"], ["rul_column"]),
        onnx.helper.make_node("Where", ["no_rul", "rul_nan", "rul_column"], ["rul"])])
    outputs = [o for o in graph.output if o.name not in ("no_rul", f"net/{RUL_OUTPUT}")]
    del graph.output[:]
    graph.output.extend([*outputs, onnx.helper.make_tensor_value_info("rul", onnx.TensorProto.FLOAT, ["N", 1])])
    for key, value in (metadata or {}).items():
        onnx.helper.set_model_props(joined, {key: value})
    proto = onnx.shape_inference.infer_shapes(joined, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    return proto
