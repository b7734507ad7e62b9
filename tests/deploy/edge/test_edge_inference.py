"""Local ONNX inference on the edge: the estimate matches the framework and reaches the twin."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy.edge.agent import EdgeAgent, EdgeConfig
from deploy.edge.inference import EdgeModelError, OnnxRULEstimator
from deploy.edge.sources import SimulatedEngine
from tests.services import Mosquitto
from twin.service import TwinConfig, TwinService

FEATURES = ["s2", "s3", "s4", "s7", "s11", "s12"]
WINDOW = 8
RNG = np.random.default_rng(0)
W1 = RNG.normal(0, 0.1, (WINDOW * len(FEATURES), 16)).astype(np.float32)
W2 = RNG.normal(0, 0.1, (16, 1)).astype(np.float32)


def reference(window: np.ndarray) -> np.ndarray:
    """(batch, window, features) -> (batch,): the small MLP the ONNX file holds, in numpy."""
    x = (window.reshape(len(window), -1) - 500.0) / 500.0
    return (np.maximum(x @ W1, 0) @ W2)[:, 0] + 100.0


def write_model(path: Path, metadata: dict[str, str]) -> Path:
    nodes = [helper.make_node("Reshape", ["window", "flat_shape"], ["flat"]),
             helper.make_node("Sub", ["flat", "c500"], ["centred"]),
             helper.make_node("Div", ["centred", "c500"], ["scaled"]),
             helper.make_node("MatMul", ["scaled", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["o"]), helper.make_node("Add", ["o", "c100"], ["o100"]),
             helper.make_node("Reshape", ["o100", "out_shape"], ["rul"])]
    inits = [numpy_helper.from_array(np.array([-1, WINDOW * len(FEATURES)], np.int64), "flat_shape"),
             numpy_helper.from_array(np.array([-1], np.int64), "out_shape"),
             numpy_helper.from_array(np.array(500.0, np.float32), "c500"),
             numpy_helper.from_array(np.array(100.0, np.float32), "c100"),
             numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2")]
    graph = helper.make_graph(nodes, "rul", [helper.make_tensor_value_info("window", TensorProto.FLOAT,
                                                                           ["batch", WINDOW, len(FEATURES)])],
                              [helper.make_tensor_value_info("rul", TensorProto.FLOAT, ["batch"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)  # ORT reads IR <= 13
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture
def model_file(tmp_path):
    return write_model(tmp_path / "rul.onnx", {"features": '["s2", "s3", "s4", "s7", "s11", "s12"]',
                                               "window": str(WINDOW), "rul_rmse": "14.5"})


def test_estimator_matches_the_model_on_a_sliding_window(model_file):
    estimator = OnnxRULEstimator(model_file)
    ticks = list(SimulatedEngine(seed=0, life_cycles=20))
    estimates = [estimator.update(t) for t in ticks]
    rows = np.array([[t[f] for f in FEATURES] for t in ticks], dtype=np.float32)
    padded = np.concatenate([np.repeat(rows[:1], WINDOW, axis=0), rows])
    expected = reference(np.stack([padded[i + 1:i + 1 + WINDOW] for i in range(len(ticks))]))
    assert np.allclose(estimates, expected, atol=1e-3) and estimator.rul_rmse == 14.5
    assert estimator.update({"s2": 1.0}) is None, "a tick without every feature gives no estimate"


def test_missing_metadata_is_a_clear_error(tmp_path):
    path = write_model(tmp_path / "bare.onnx", {})
    with pytest.raises(EdgeModelError, match="features"):
        OnnxRULEstimator(path)


def test_edge_estimate_reaches_the_twin_as_engine_health(model_file, tmp_path):
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed")
    with Mosquitto(workdir=tmp_path / "mq") as broker:
        twin = TwinService(config=TwinConfig(broker_port=broker.port, db=str(tmp_path / "t.db"),
                                             client_id="twin-onnx")).start()
        try:
            twin.wait_connected()
            EdgeAgent(config=EdgeConfig(port=broker.port, node="edge-cell-1", device="engine-1", rate_hz=200,
                                        spool=tmp_path / "e.spool"),
                      source=SimulatedEngine(seed=1, life_cycles=50), estimator=OnnxRULEstimator(model_file)).run()
            twin.store.flush()
            health = twin.state.devices["engine-1"].health
            last = twin.store.history("engine-1", latest=True, limit=1)[0]
            assert health.source == "edge-onnx" and health.rul == pytest.approx(last["values"]["rul_edge"])
            assert last["rul"] == pytest.approx(health.rul) and twin.store.count("history") == 50
        finally:
            twin.stop()


@pytest.mark.slow
def test_exported_maintenance_model_runs_on_the_edge_in_fp32_and_int8(tmp_path):
    from deploy.edge.quantize import quantize_for_edge
    from manufacturing.maintenance import quick
    from manufacturing.maintenance.export import export_rul_onnx
    from manufacturing.maintenance.rul import RULEstimator
    from manufacturing.maintenance.streaming import StreamingRULPredictor

    quick.train_quick_rul_model(tmp_path / "rul", num_units=16, max_epochs=1, seed=0)
    estimator = RULEstimator.load(tmp_path / "rul")  # as saved, with its validation metrics
    fp32 = export_rul_onnx(estimator, tmp_path / "rul.onnx")
    int8 = quantize_for_edge(fp32, tmp_path / "rul_int8.onnx")
    edge32, edge8 = OnnxRULEstimator(fp32), OnnxRULEstimator(int8)
    reference = StreamingRULPredictor(estimator)
    got32, got8, expected = [], [], []
    for tick in SimulatedEngine(seed=5, life_cycles=45):
        got32.append(edge32.update(tick))
        got8.append(edge8.update(tick))
        expected.append(reference.update("u", {k.replace("setting", "setting_") if k.startswith("setting") else
                                               ("s_" + k[1:] if k[0] == "s" else k): v for k, v in tick.items()}))
    assert np.allclose(got32, expected, atol=1e-2), "the edge normalises and windows like the twin's predictor"
    assert np.max(np.abs(np.array(got8) - np.array(expected))) < 10.0, "INT8 stays within a few cycles"
    assert edge32.rul_rmse is not None and int8.stat().st_size < fp32.stat().st_size


def test_exported_model_with_regime_history_counts_cycles_on_the_edge(tmp_path, tiny_rul_estimator):
    from manufacturing.maintenance.export import export_rul_onnx
    from manufacturing.maintenance.generator import generate_cmapss
    from manufacturing.maintenance.streaming import StreamingRULPredictor

    estimator = tiny_rul_estimator("moe-ensemble", num_regimes=6)
    estimator.fit(generate_cmapss(10, num_regimes=6, seed=4, max_life=160))
    edge = OnnxRULEstimator(export_rul_onnx(estimator, tmp_path / "rul.onnx"))
    reference = StreamingRULPredictor(estimator)
    engine = generate_cmapss(1, num_regimes=6, seed=8, max_life=140).head(45)
    got, expected = [], []
    for record in engine.to_dict("records"):  # the twin's metric names: setting1.., s2..
        got.append(edge.update({k.replace("_", ""): v for k, v in record.items()}))
        expected.append(reference.update("u", record))
    assert np.allclose(got, expected, atol=1e-2), "the edge counts each regime's cycles as the twin's predictor"
