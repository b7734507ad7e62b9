"""Local ONNX inference on the edge: the estimate matches the framework and reaches the twin."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.onnx_export import export_onnx
from deploy.edge.agent import EdgeAgent, EdgeConfig
from deploy.edge.inference import EdgeModelError, OnnxRULEstimator
from deploy.edge.sources import SimulatedEngine
from twin.service import TwinConfig, TwinService
from twin.services import Mosquitto

FEATURES = ["s2", "s3", "s4", "s7", "s11", "s12"]
WINDOW = 8


class TinyRUL(nn.Module):
    """(batch, window, features) -> (batch,) RUL; a stand-in model with fixed weights for the runtime path."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(WINDOW * len(FEATURES), 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, window):  # the argument's name is the ONNX input's name
        return 100.0 + self.net((window - 500.0) / 500.0).squeeze(-1)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "rul.onnx"
    export_onnx(TinyRUL(), (torch.randn(2, WINDOW, len(FEATURES)) * 10 + 500,), path, input_names=["window"],
                output_names=["rul"], metadata={"features": FEATURES, "window": WINDOW})
    return path


def test_estimator_matches_torch_on_a_sliding_window(model_file):
    estimator = OnnxRULEstimator(model_file)
    ticks = list(SimulatedEngine(seed=0, life_cycles=20))
    estimates = [estimator.update(t) for t in ticks]
    rows = np.array([[t[f] for f in FEATURES] for t in ticks], dtype=np.float32)
    padded = np.concatenate([np.repeat(rows[:1], WINDOW, axis=0), rows])
    model = TinyRUL().eval()
    with torch.no_grad():
        expected = [model(torch.from_numpy(padded[i + 1:i + 1 + WINDOW][None])).item() for i in range(len(ticks))]
    assert np.allclose(estimates, expected, atol=1e-3)
    assert estimator.update({"s2": 1.0}) is None, "a tick without every feature gives no estimate"


def test_missing_metadata_is_a_clear_error(tmp_path):
    path = tmp_path / "bare.onnx"
    export_onnx(TinyRUL(), (torch.randn(2, WINDOW, len(FEATURES)),), path, input_names=["window"],
                output_names=["rul"])
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
