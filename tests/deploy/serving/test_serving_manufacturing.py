"""The server with the manufacturing models: RUL (model folder and ONNX export) and the defect
detector (YOLO run folder and ONNX export), each trained here on generated data. Answers match
the verticals' own predictions under concurrent requests, malformed requests get a 422 naming the
field, and every answer carries the model version."""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from deploy.serving.adapters import AdapterOptions, load_adapter
from deploy.serving.app import create_app
from deploy.serving.batcher import BatcherConfig
from deploy.serving.defects import DefectsAdapter, encode_image
from deploy.serving.maintenance import RULAdapter

BATCHING = BatcherConfig(max_wait_s=0.005, default_timeout_s=30.0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`moeworks serve MODEL ...` under gunicorn on a free loopback port."""

    def __init__(self, model, *extra):
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        self.process = subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve", str(model), "--port",
                                         str(self.port), "--max-wait-ms", "5", *extra],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read().decode()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError("server not ready in 180 s")

    def post(self, body):
        return httpx.post(f"http://127.0.0.1:{self.port}/v1/predict", json=body, timeout=60)

    def __exit__(self, *_):
        self.process.terminate()
        self.process.wait(timeout=30)


# --- RUL ----------------------------------------------------------------------------------------

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
    adapter = load_adapter(onnx_path, AdapterOptions(quantize="int8_dynamic"))
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


# --- defects ------------------------------------------------------------------------------------

def _same_defects(got, want):
    """The served defects are the inspector's own: counts within the few boxes a batched forward's
    float reassociation can move across the threshold, and every confident box found in both."""
    assert abs(len(got) - len(want)) <= 2, (len(got), len(want))
    for d in (d for d in got if d["score"] >= 0.01):
        assert any(r["class"] == d["class"] and abs(r["score"] - d["score"]) < 1e-3
                   and np.abs(np.subtract(r["box_px"], d["box_px"])).max() <= 0.5 for r in want), d


@pytest.mark.slow
def test_defect_detector_served_from_run_folder_and_onnx_export(tmp_path):
    """One function for the whole cycle: a fixture would train once per xdist worker."""
    from manufacturing.defects.dataset import load_image
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.pipeline import DefectInspector, InspectionConfig
    from manufacturing.defects.synthetic import SyntheticConfig, write_synthetic_voc
    from manufacturing.defects.train import DetectorConfig
    from manufacturing.defects.workflow import TrainJob, export_job, train_job

    voc = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=8, size=96, seed=1))
    train_job(voc, tmp_path / "run", TrainJob(detector=DetectorConfig(imgsz=64, epochs=1, batch=4, workers=0),
                                              val_fraction=0.25, train_moe=False), verbose=False)
    export_job(tmp_path / "run" / "detector.pt", tmp_path / "export", voc, int8=False, parity_images=2)
    camera = tmp_path / "camera.json"
    camera.write_text(json.dumps({"mm_per_pixel": 0.25, "min_size_mm": 0.0}))
    images = [load_image(p) for p in sorted((voc / "IMAGES").glob("*.png"))[:4]]
    images.append(np.hstack([images[0], images[1], images[2]]))  # a wide frame: tiled by the inspector
    bodies = [{"instances": [{"image": encode_image(im)}]} for im in images]

    # The run folder (PyTorch) under gunicorn: answers equal the vertical's own report.
    from manufacturing.defects.calibration import Calibration

    inspector = DefectInspector(detector=YoloDetector.load(tmp_path / "run" / "detector.pt"),
                                calibration=Calibration.from_file(camera), config=InspectionConfig(conf=0.001))
    expected = [inspector.report(d) for d in inspector.detect(images)]
    assert sum(map(len, expected)) > 0, "an untrained detector at score 0.001 still returns boxes"
    with Served(tmp_path / "run", "--camera", str(camera), "--conf", "0.001") as server:
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(server.post, bodies))
        broken = server.post({"instances": [{"image": "bm90IGFuIGltYWdl"}]})  # base64 of "not an image"
    for answer, want, image in zip(answers, expected, images, strict=True):
        assert answer.status_code == 200, answer.text
        (prediction,) = answer.json()["predictions"]
        assert answer.json()["model_version"].startswith("sha256:")
        assert prediction["width_px"] == image.shape[1] and prediction["height_px"] == image.shape[0]
        _same_defects(prediction["defects"], want)
        for got in prediction["defects"]:
            assert got["width_mm"] == pytest.approx((got["box_px"][2] - got["box_px"][0]) * 0.25, abs=0.05)
    assert broken.status_code == 422 and broken.json()["detail"][0]["loc"] == ["body", "instances", 0, "image"]

    # The ONNX export folder through the real app and batcher: concurrent images share forwards.
    adapter = load_adapter(tmp_path / "export", AdapterOptions(camera=camera, conf=0.001))
    assert isinstance(adapter, DefectsAdapter) and adapter.runtime == "onnxruntime+fp32"
    onnx_inspector = DefectInspector(detector=YoloDetector.load(tmp_path / "export" / "detector.onnx"),
                                     calibration=Calibration.from_file(camera), config=InspectionConfig(conf=0.001))
    onnx_expected = [onnx_inspector.report(d) for d in onnx_inspector.detect(images)]
    assert sum(map(len, onnx_expected)) > 0
    with TestClient(create_app(lambda: adapter, batcher_config=BATCHING)) as client:
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda b: client.post("/v1/predict", json=b), bodies * 3))
        metrics = client.get("/metrics").text
        malformed = [client.post("/v1/predict", json=body).json() for body in (
            {"instances": [{}]}, {"instances": [{"image": 5}]}, {"instances": [{"image": "###"}]},
            {"instances": [{"image": bodies[0]["instances"][0]["image"], "mm": 1}]})]
    for answer, want in zip(answers, onnx_expected * 3, strict=True):
        assert answer.status_code == 200 and answer.json()["model_version"] == adapter.version
        _same_defects(answer.json()["predictions"][0]["defects"], want)
    assert float(metrics.split("moeworks_batch_rows_count ")[1].split()[0]) < len(answers) + 2  # + warm-up
    assert [m["detail"][0]["loc"][-1] for m in malformed] == ["image", "image", "image", "mm"]
    assert all(m["model_version"] == adapter.version for m in malformed)


def test_rul_model_with_regime_history_and_running_means_served_like_the_estimator(tmp_path, tiny_rul_estimator):
    from manufacturing.maintenance.generator import generate_cmapss

    estimator = tiny_rul_estimator("moe-ensemble", num_regimes=6)
    estimator.fit(generate_cmapss(10, num_regimes=6, seed=4, max_life=160))
    estimator.save(tmp_path / "model")
    test = generate_cmapss(4, num_regimes=6, seed=7)
    young = test["unit"] == test["unit"].iloc[0]  # younger than the window: padded in front
    test = test[~young | (test["cycle"] <= 12)].reset_index(drop=True)
    adapter = load_adapter(tmp_path / "model")
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
