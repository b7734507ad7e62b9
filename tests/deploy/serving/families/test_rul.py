"""The RUL family served: a `maintenance train` folder (PyTorch, under gunicorn) and its ONNX export
(onnxruntime INT8), trained here on generated engines. Answers match the estimator's own predictions
under concurrent requests, malformed requests get a 422 naming the field, and every answer carries
the model version."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from deploy.serving.app import create_app
from deploy.serving.base import AdapterOptions
from deploy.serving.batcher import BatcherConfig
from deploy.serving.families.rul import RULAdapter
from deploy.serving.registry import REGISTRY
from tests.deploy.serving.served import Served

BATCHING = BatcherConfig(max_wait_s=0.005, default_timeout_s=30.0)


@pytest.fixture(scope="module")
def rul_model(tmp_path_factory):
    from manufacturing.maintenance.export import export_model_folder
    from manufacturing.maintenance.generator import generate_cmapss
    from manufacturing.maintenance.quick import train_quick_rul_model

    root = tmp_path_factory.mktemp("rul")
    estimator, _ = train_quick_rul_model(root / "model", num_units=16, max_epochs=2, seed=0)
    (onnx_path,) = export_model_folder(root / "model", root / "export")
    test = generate_cmapss(6, num_regimes=1, seed=5)
    # One engine younger than the window: the server pads its history as training windows do.
    young = test["unit"] == test["unit"].iloc[0]
    test = test[~young | (test["cycle"] <= 12)].reset_index(drop=True)
    return root / "model", onnx_path, estimator, test


def _rul_instances(estimator, frame):
    columns = ["setting_1", "setting_2", "setting_3", *estimator.normalizer_.sensors_]
    window = estimator.net_.window
    return [{"cycles": group[columns].to_numpy()[-window:].tolist()} for _, group in frame.groupby("unit", sort=True)]


def test_rul_folder_served_under_gunicorn_matches_the_estimator(rul_model):
    folder, _, estimator, test = rul_model
    expected = estimator.predict(test)["rul"].to_numpy()
    instances = _rul_instances(estimator, test)
    assert len(instances[0]["cycles"]) == 12 < estimator.net_.window
    with Served(folder) as server:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: server.post({"instances": [i]}), instances * 4))
        info = httpx.get(f"http://127.0.0.1:{server.port}/v1/model").json()
        bad = server.post({"instances": [{"cycles": [row[:-1] for row in instances[1]["cycles"]]}]})
        long = server.post({"instances": [{"cycles": instances[1]["cycles"] * 2}]})
    assert info["columns"][:3] == ["setting_1", "setting_2", "setting_3"] and info["runtime"] == "torch+fp32"
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_version"] == info["model_version"] and body["model"] == "rul-lstm"
        assert body["predictions"][0]["rul"] == pytest.approx(float(expected[i % len(expected)]), abs=1e-3)
    for answer in (bad, long):
        assert answer.status_code == 422 and answer.json()["model_version"] == info["model_version"]
        assert answer.json()["detail"][0]["loc"] == ["body", "instances", 0, "cycles"]


def test_rul_onnx_export_served_in_int8_close_to_pytorch(rul_model, tmp_path):
    _, onnx_path, estimator, test = rul_model
    expected = estimator.predict(test)["rul"].to_numpy()
    adapter = REGISTRY.from_path(onnx_path, AdapterOptions(quantize="int8_dynamic"))
    assert isinstance(adapter, RULAdapter) and adapter.runtime == "onnxruntime+int8_dynamic"
    with TestClient(create_app(lambda: adapter, batcher_config=BATCHING)) as client:
        instances = _rul_instances(estimator, test)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: client.post("/v1/predict", json={"instances": [i]}), instances))
        got = np.array([a.json()["predictions"][0]["rul"] for a in answers])
        nan = client.post("/v1/predict", content=json.dumps(  # Python's json writes NaN; the server refuses it
            {"instances": [{"cycles": [[float("nan")] * len(adapter.columns)]}]}))
        missing = client.post("/v1/predict", json={"instances": [{"window": instances[0]["cycles"]}]})
    assert all(a.json()["model_version"] == adapter.version for a in answers)
    assert np.abs(got - expected).max() < 3.0, (got, expected)  # INT8 LSTM: within 3 cycles of FP32
    assert nan.status_code == 422 and nan.json()["detail"][0]["type"] == "json_invalid"  # NaN is not JSON
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"][-1] == "window"


def test_rul_model_with_regime_history_and_running_means_served_like_the_estimator(tmp_path, tiny_rul_estimator):
    from manufacturing.maintenance.generator import generate_cmapss

    estimator = tiny_rul_estimator("moe-ensemble", num_regimes=6)
    estimator.fit(generate_cmapss(10, num_regimes=6, seed=4, max_life=160))
    estimator.save(tmp_path / "model")
    test = generate_cmapss(4, num_regimes=6, seed=7)
    young = test["unit"] == test["unit"].iloc[0]  # younger than the window: padded in front
    test = test[~young | (test["cycle"] <= 12)].reset_index(drop=True)
    adapter = REGISTRY.from_path(tmp_path / "model")
    assert [f.name for f in adapter.fields] == ["cycles", "regime_cycles", "regime_sensor_sums"]
    instances = _rul_instances(estimator, test)
    normalizer = estimator.normalizer_
    for instance, (_, rows) in zip(instances, test.groupby("unit", sort=True), strict=True):
        # The engine's totals over its whole life so far (longer than the window it sends).
        one_hot = np.eye(6)[normalizer.regimes(rows[["setting_1", "setting_2", "setting_3"]].to_numpy())]
        instance["regime_cycles"] = one_hot.sum(0).tolist()
        instance["regime_sensor_sums"] = (one_hot.T @ rows[normalizer.sensors_].to_numpy()).tolist()
    inputs, rows = adapter.parse({"instances": instances})
    got = adapter.predict(inputs)["rul"]
    # Raw cycles arrive as float32 (the estimator reads float64): equal to within 1e-2 cycles.
    np.testing.assert_allclose(got, estimator.predict(test)["rul"].to_numpy(), atol=1e-2)
    assert adapter.predict(adapter.example(3))["rul"].shape == (3,)
