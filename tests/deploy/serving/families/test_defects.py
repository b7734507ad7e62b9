"""The defects family served: a `defects train` run folder (YOLO in PyTorch, under gunicorn) and its
ONNX export, trained here on generated surfaces. Answers match the inspector's own reports under
concurrent requests, malformed images get a 422 naming the field, and every answer carries the
model version."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deploy.serving.app import create_app
from deploy.serving.base import AdapterOptions
from deploy.serving.batcher import BatcherConfig
from deploy.serving.families.defects import DefectsAdapter, encode_image
from deploy.serving.registry import REGISTRY
from tests.deploy.serving.served import Served

BATCHING = BatcherConfig(max_wait_s=0.005, default_timeout_s=30.0)


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
    adapter = REGISTRY.from_path(tmp_path / "export", AdapterOptions(camera=camera, conf=0.001))
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


