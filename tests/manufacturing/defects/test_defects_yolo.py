"""A tiny YOLO training run through the CLI (generated images, one epoch), then evaluate, predict and
export with ONNX parity. Slow (a real ultralytics training and an ONNX export) but within budget.

One test function walks the whole cycle: under `pytest -n 2` a shared fixture would be built once
per worker, training twice."""

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from deploy.cli import app
from manufacturing.defects.dataset import load_image
from manufacturing.defects.detector import YoloDetector
from manufacturing.defects.export import detector_parity
from manufacturing.defects.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, write_synthetic_voc

pytestmark = pytest.mark.slow


def _train(root):
    voc = write_synthetic_voc(root / "voc", SyntheticConfig(images=12, size=96, seed=1))
    result = CliRunner().invoke(app, ["defects", "train", "--data", str(voc), "--out", str(root / "run"),
                                      "--imgsz", "64", "--epochs", "1", "--batch", "4", "--val-fraction", "0.25",
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    return root, voc, summary


def test_train_then_evaluate_predict_and_export(tmp_path, request):
    run = _train(tmp_path)
    _model_loads_and_predicts(run)
    _evaluate_prints_metrics_for_yolo_and_yolo_plus_moe_as_json(run)
    _predict_writes_json_in_mm_and_annotated_images_and_tiles_large_frames(run, tmp_path / "predict")
    try:  # real NEU-DET images where the data folder exists (CI), the generated ones otherwise
        parity_images = sorted((request.getfixturevalue("data_root") / "neu_det" / "IMAGES").glob("*.jpg"))[::150]
    except pytest.skip.Exception:
        parity_images = sorted((run[1] / "IMAGES").glob("*.png"))
    _export_onnx_parity_on_real_images_and_int8(run, tmp_path / "export", parity_images)
    _bad_images_are_one_line_errors_naming_the_file(run, tmp_path / "bad")


def _model_loads_and_predicts(run):
    root, voc, summary = run
    assert summary["epochs"] == 1 and summary["imgsz"] == 64 and summary["train_images"] == 9
    assert json.loads((root / "run" / "split.json").read_text())["seed"] == 0
    detector = YoloDetector.load(summary["detector"])
    assert detector.names == sorted(SYNTHETIC_CLASSES) and detector.imgsz == 64
    # results.csv is read back into the checkpoint by our trainer, without polars, and kept in our
    # weights-only detector file's metadata.
    import torch

    history = torch.load(summary["detector"], weights_only=True)["metadata"]["train_results"]
    assert history["epoch"] == [1] and len(history["metrics/mAP50(B)"]) == 1
    image = load_image(voc / "IMAGES" / "generated_0000.png")
    (dets,) = detector.detect([image], conf=0.0001, max_det=50)
    assert 0 < len(dets) <= 50 and dets.class_scores.shape == (len(dets), 4)
    assert (dets.boxes >= 0).all() and (dets.boxes[:, [0, 2]] <= 96).all() and (dets.boxes[:, [1, 3]] <= 96).all()
    assert (np.diff(dets.scores) <= 0).all()


def _evaluate_prints_metrics_for_yolo_and_yolo_plus_moe_as_json(run):
    root, voc, summary = run
    result = CliRunner().invoke(app, ["defects", "evaluate", "--data", str(voc), "--model", summary["detector"],
                                      "--moe-stage", summary["moe_stage"], "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["images"] == 12
    for variant in ("yolo", "yolo+moe"):
        assert set(metrics[variant]["per_class"]) == set(SYNTHETIC_CLASSES)
        assert 0 <= metrics[variant]["mAP50-95"] <= metrics[variant]["mAP50"] <= 1


def _predict_writes_json_in_mm_and_annotated_images_and_tiles_large_frames(run, tmp_path):
    root, voc, summary = run
    frame = np.hstack([cv2.imread(str(p)) for p in sorted((voc / "IMAGES").glob("*.png"))[:3]])  # 288 x 96 px
    (tmp_path / "in").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "in" / "frame.png"), frame)
    result = CliRunner().invoke(app, ["defects", "predict", "--data", str(tmp_path / "in"), "--model",
                                      summary["detector"], "--out", str(tmp_path / "out"), "--conf", "0.0001",
                                      "--mm-per-pixel", "0.5", "--min-size-mm", "0"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert payload["calibration"]["mm_per_pixel_x"] == 0.5
    defects = payload["images"][0]["defects"]
    assert defects, "an untrained detector at score 1e-4 still returns boxes"
    for d in defects:
        x1, y1, x2, y2 = d["box_px"]
        assert d["width_mm"] == pytest.approx((x2 - x1) * 0.5, abs=0.1) and 0 <= x1 < x2 <= 288
    assert (tmp_path / "out" / "frame.annotated.jpg").exists()


def _export_onnx_parity_on_real_images_and_int8(run, tmp_path, parity_images):
    root, voc, summary = run
    result = CliRunner().invoke(app, ["defects", "export", "--model", summary["detector"], "--data", str(voc),
                                      "--moe", summary["moe_stage"], "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    exported = json.loads((tmp_path / "export.json").read_text())
    assert "parity on 12 images" in result.output
    assert exported["parity"]["passed"] and exported["moe_max_abs_logit_difference"] < 1e-4
    assert exported["batch"] == "dynamic" and exported["parity"]["batch_sizes"] == [1, 8]
    assert exported["moe_parity"]["passed"] and exported["moe_parity"]["batch_sizes"] == [1, 8]
    # INT8 is calibrated on the training split recorded beside the checkpoint, never on validation images.
    assert exported["int8_calibration"] == {"images": 9, "from": f"train split of {root / 'run' / 'split.json'}"}
    torch_detector = YoloDetector.load(summary["detector"])
    onnx_detector = YoloDetector.load(exported["detector_onnx"])
    assert onnx_detector.names == torch_detector.names and onnx_detector.imgsz == 64
    images = [load_image(p) for p in parity_images]
    parity = detector_parity(torch_detector, onnx_detector, images)
    assert parity.passed, parity
    torch_boxes = torch_detector.detect(images, conf=0.001)
    onnx_boxes = onnx_detector.detect(images, conf=0.001)
    for a, b in zip(torch_boxes, onnx_boxes, strict=True):
        assert len(a) == len(b)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=0.05)
    # One call at batch 3 gives each image what it gets alone: the batch axis is free, FP32 and INT8.
    batch = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    int8 = YoloDetector.load(exported["detector_int8_onnx"])
    for model in (onnx_detector, int8):
        assert model.session.get_inputs()[0].shape[0] == "batch"
        together = model.raw(batch)
        assert together.shape == torch_detector.raw(batch).shape
        np.testing.assert_allclose(together, np.concatenate([model.raw(batch[i:i + 1]) for i in range(3)]),
                                   atol=1e-4)
    # The MoE stage's ONNX file runs where its checkpoint does.
    result = CliRunner().invoke(app, ["defects", "evaluate", "--data", str(voc), "--model", exported["detector_onnx"],
                                      "--moe", exported["moe_onnx"], "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["yolo+moe"]["mAP50"] >= 0


def _bad_images_are_one_line_errors_naming_the_file(run, tmp_path):
    import shutil

    root, voc, summary = run
    folder = tmp_path / "voc"
    shutil.copytree(voc, folder)
    cv2.imwrite(str(folder / "IMAGES" / "generated_0003.png"), np.zeros((40, 60, 3), np.uint8))
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "frame_7.png").write_bytes(b"\x89PNG\r\n truncated")
    (tmp_path / "empty").mkdir()
    cases = {("evaluate", "--data", str(folder)): "generated_0003.png: field <size> says 96x96 but the image is 60x40",
             ("predict", "--source", str(tmp_path / "frames"), "--out", str(tmp_path / "out")):
                 "frame_7.png: corrupt or unsupported image file",
             ("predict", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "out")):
                 "empty: empty folder: no images"}
    for (command, *args), message in cases.items():
        result = CliRunner().invoke(app, ["defects", command, *args, "--model", summary["detector"]])
        # Exit 2 through the command's clean exit, not an escaped exception. (Under CliRunner, ultralytics'
        # logger may print a "Logging error" about an earlier invocation's closed stream: not ours.)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert message in result.output.strip().splitlines()[-1], result.output
