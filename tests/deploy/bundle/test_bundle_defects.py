"""The defect detector's bundle (deploy/bundle/defects_graph.py): camera frames in, detections with sizes
in mm out, against moeworks' DefectInspector on real NEU-DET frames (generated ones without the data).

The detector is the shipped one fine-tuned here for one epoch (generated surfaces, 192 px: `defects train
--weights` as a user runs it), so that its scores vary from box to box: a detector trained from scratch
for one epoch scored every box alike (0.00078 on each of 30), and which of tied boxes NMS keeps is
ultralytics' or onnxruntime's choice, not the model's (5 boxes a frame against 4). It is built with a
threshold of 0.1, where it finds boxes on part of the frames.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.bundle.build import DetectorOptions, build_bundle, run_graph, verify_bundle
from deploy.bundle.credit_features import BundleError
from deploy.bundle.defects_card import TOLERANCES, inspector_outputs
from deploy.bundle.defects_graph import OUTPUTS
from deploy.bundle.graph import GraphBuilder

ROOT = Path(__file__).resolve().parents[3]
PARTNER = Path(__file__).resolve().parent
CONF = 0.1  # where the one epoch on generated surfaces leaves detections on part of the NEU-DET frames


def _real_frames(data_root: Path | None, count: int) -> list[np.ndarray]:
    """BGR frames: NEU-DET images (200 px, grey) where the data is, else generated surfaces."""
    from manufacturing.defects.dataset import load_image

    if data_root is not None:
        paths = sorted((data_root / "neu_det" / "IMAGES").glob("*.jpg"))[::97][:count]
        if paths:
            return [load_image(p) for p in paths]
    from manufacturing.defects.synthetic import planted_image

    rng = np.random.default_rng(3)
    return [np.repeat(planted_image(rng, 200, 3)[0][:, :, None], 3, axis=2) for _ in range(count)]


@pytest.fixture(scope="module")
def frames(request) -> list[np.ndarray]:
    try:
        root = request.getfixturevalue("data_root")
    except pytest.skip.Exception:
        root = None
    return _real_frames(root, 12)


@pytest.mark.parametrize("size", [64, 96])
def test_letterbox_in_the_graph_is_opencv_bit_for_bit_where_it_downscales(frames, size):
    """Down- and upscaled, square and not, and one frame already at the input size (no resize). OpenCV's
    uint8 INTER_LINEAR (11-bit weights, integer vertical pass) is reproduced: identical where it downscales
    (camera frames larger than the input), within one grey level in few pixels where it upscales."""
    import onnxruntime as ort

    from deploy.bundle.defects_graph import _letterbox
    from manufacturing.defects.detector import to_input

    g = GraphBuilder()
    batch, _, _, _ = _letterbox(g, g.input("image", "uint8", ["N", "H", "W", 3]), size, 114)
    g.output(batch, "batch")
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    for height, width in ((200, 200), (100, 120), (120, 100), (50, 40), (size, size)):
        cut = [np.ascontiguousarray(f[:height, :width]) for f in frames]
        want, _ = to_input(cut, size)
        got = session.run(None, {"image": np.stack([f[:, :, ::-1] for f in cut])})[0]
        levels = np.rint(np.abs(got - want) * 255)
        assert got.shape == want.shape and levels.max() <= 1.0, (height, width)
        upscaled = min(size / height, size / width) > 1.0
        assert (levels > 0).mean() < (0.01 if upscaled else 1e-9), (height, width, (levels > 0).mean())
        padding = (want == 114 / 255).all(axis=(0, 1))  # grey border rows/columns are the same rows/columns
        assert ((got == 114 / 255).all(axis=(0, 1)) == padding).all()


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory) -> Path:
    """`moeworks defects train --weights` from the shipped detector on generated surfaces: 192 px, one epoch,
    no MoE stage (~1 min)."""
    from typer.testing import CliRunner

    from deploy.cli import app
    from manufacturing.defects.synthetic import SyntheticConfig, write_synthetic_voc

    root = tmp_path_factory.mktemp("defects")
    voc = write_synthetic_voc(root / "voc", SyntheticConfig(images=12, size=96, seed=1))
    result = CliRunner().invoke(app, ["defects", "train", "--data", str(voc), "--out", str(root / "run"),
                                      "--imgsz", "192", "--epochs", "1", "--batch", "4", "--val-fraction", "0.25",
                                      "--no-train-moe", "--json",
                                      "--weights", str(ROOT / "manufacturing" / "defects" / "weights" / "neu_det.pt")])
    assert result.exit_code == 0, result.output
    return root / "run"


def _above(outputs: dict[str, np.ndarray], floor: float) -> dict[str, np.ndarray]:
    keep = outputs["scores"] >= floor
    return {name: values[keep] for name, values in outputs.items()}


@pytest.mark.slow
def test_detector_bundle_reproduces_the_inspector_on_real_frames(data_root, detector_run, frames, tmp_path):
    """NEU-DET frames only (`data_root` skips without them): the fine-tuned detector finds little on generated ones."""
    from manufacturing.defects.calibration import Calibration
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.pipeline import DefectInspector, InspectionConfig

    calibration = tmp_path / "camera.json"
    calibration.write_text(json.dumps({"mm_per_pixel_x": 0.05, "mm_per_pixel_y": 0.08, "min_size_mm": 0.3}))
    out = Path(build_bundle(detector_run, tmp_path / "b",
                            detector=DetectorOptions(conf=CONF, calibration=calibration))["bundle"])
    inspector = DefectInspector(detector=YoloDetector.load(detector_run / "detector.pt"),
                                calibration=Calibration(0.05, 0.08, 0.3), config=InspectionConfig(conf=CONF))
    compared = 0
    # whole frames and crops, up to tile_above x 192 px (larger ones moeworks tiles: the card says so):
    # resized up and down, square and not, and one at the input size (not resized)
    for height, width in ((200, 200), (160, 180), (192, 192)):
        rgb = np.stack([f[:height, :width, ::-1] for f in frames])
        # one grey level of resizing moves a score by a little: a box near the threshold can be in one and not
        # the other (as the build leaves out such frames from the test vectors), so compare those well above it
        got = _above(run_graph(out / "model.onnx", {"image": rgb}), 1.5 * CONF)
        want = _above(inspector_outputs(inspector, rgb), 1.5 * CONF)
        assert [got[name].shape for name in OUTPUTS] == [want[name].shape for name in OUTPUTS], (height, width)
        np.testing.assert_array_equal(got["image_index"], want["image_index"])
        np.testing.assert_array_equal(got["classes"], want["classes"])
        for name in ("boxes", "scores"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCES[name])
        # widths and heights to the box's half pixel; the area (mm^2) then moves with the box's size
        np.testing.assert_allclose(got["sizes_mm"][:, :2], want["sizes_mm"][:, :2], rtol=0, atol=TOLERANCES["sizes_mm"])
        np.testing.assert_allclose(got["sizes_mm"][:, 2], want["sizes_mm"][:, 2], rtol=1e-2)
        compared += len(want["scores"])
        assert len(set(want["image_index"])) >= len(frames) // 4, (height, width)  # detections on several frames
    assert compared >= 12
    # sizes are the calibration's: width x 0.05 mm, height x 0.08 mm; nothing under 0.3 mm is left
    boxes, sizes = got["boxes"].astype(np.float64), got["sizes_mm"]
    np.testing.assert_allclose(sizes[:, 0], (boxes[:, 2] - boxes[:, 0]) * 0.05, rtol=1e-6)
    np.testing.assert_allclose(sizes[:, 2], sizes[:, 0] * sizes[:, 1], rtol=1e-9)
    assert (np.maximum(sizes[:, 0], sizes[:, 1]) >= 0.3).all()
    card = json.loads((out / "card.json").read_text())
    assert card["model"]["family"] == "defects/yolo-detector" and card["model"]["classes"] == inspector.detector.names
    assert card["postprocessing"]["calibration"]["mm_per_pixel_y"] == 0.08 and card["postprocessing"]["conf"] == CONF
    assert [o["name"] for o in card["outputs"]] == list(OUTPUTS) and "NOT in this bundle" not in card["model"][
        "second_stage"]
    vectors = json.loads((out / "test_vectors.json").read_text())
    assert vectors["dtypes"] == {"image": "uint8"} and vectors["rows"] >= 4
    flat = np.array(vectors["inputs"]["image"][-3:])  # black, white and grey frames: the extremes
    assert [int(f.min()) for f in flat] == [0, 255, 114] == [int(f.max()) for f in flat]
    assert verify_bundle(out)["test_vectors"] == vectors["rows"]


@pytest.mark.slow
def test_detector_bundle_refuses_a_missing_moe_stage_and_defect_options_elsewhere(detector_run, tmp_path):
    with pytest.raises(BundleError, match="moe_stage.pt: no such model file"):
        build_bundle(detector_run, tmp_path / "b", detector=DetectorOptions(moe_stage=tmp_path / "moe_stage.pt"))
    with pytest.raises(BundleError, match="takes the stage's checkpoint"):
        build_bundle(detector_run, tmp_path / "b", detector=DetectorOptions(moe_stage=tmp_path / "moe_stage.onnx"))
    with pytest.raises(BundleError, match="apply to defect detectors only"):
        build_bundle(tmp_path, tmp_path / "c", detector=DetectorOptions(conf=0.3))
    with pytest.raises(BundleError, match="--conf must lie"):
        DetectorOptions(conf=1.5)
    refused = subprocess.run([sys.executable, "-m", "deploy.cli", "bundle", "build", "--model", str(detector_run),
                              "--out", str(tmp_path / "d"), "--moe-stage", str(tmp_path / "moe_stage.pt")],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "no such model file" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "d").exists()


def test_stage_crops_in_the_graph_are_opencv_inter_area_to_one_grey_level(frames):
    """The graph's crops (per-box weight matrices) against `crops_and_geometry` (cv2.INTER_AREA) for boxes of
    NEU-DET's sizes, 8-200 px: downscaled (area path), upscaled and mixed (two-tap path), at the frame's edges."""
    import onnxruntime as ort

    from deploy.bundle.defects_stage import crops_and_geometry
    from manufacturing.defects.moe_stage import CropMoEConfig
    from manufacturing.defects.moe_stage import crops_and_geometry as moeworks_crops

    config = CropMoEConfig()
    g = GraphBuilder()
    crops, geometry = crops_and_geometry(g, g.input("image", "uint8", ["N", "H", "W", 3]),
                                         g.input("boxes", "float", ["K", 4]), g.input("frame", "int64", ["K"]),
                                         crop_size=config.crop_size, context=config.context)
    g.output(crops, "crops")
    g.output(geometry, "geometry")
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    images = [np.ascontiguousarray(f[:200, :200]) for f in frames[:4]]
    rng = np.random.default_rng(0)
    side = rng.uniform(8, 200, (240, 2)) * rng.uniform(0.7, 1.3, (240, 1))
    corner = rng.uniform(-10, 200, (240, 2)) - side / 2
    boxes = np.clip(np.concatenate([corner, corner + side], axis=1), 0, 200).astype(np.float32)
    boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 2) & (boxes[:, 3] - boxes[:, 1] >= 2)]
    frame = rng.integers(0, len(images), len(boxes))
    got, got_geometry = session.run(None, {"image": np.stack([im[:, :, ::-1] for im in images]), "boxes": boxes,
                                           "frame": frame})
    want = [moeworks_crops(images[f], boxes[k:k + 1], config) for k, f in enumerate(frame)]
    levels = np.abs(got - np.concatenate([w[0] for w in want])) * 255
    np.testing.assert_allclose(got_geometry, np.concatenate([w[1] for w in want]), rtol=0, atol=1e-6)
    assert levels.max() <= 1.0 + 1e-4
    patch = np.minimum(boxes[:, 2:] - boxes[:, :2], 200 / 1.3) * 1.3  # about the patch with its margin
    area = (patch >= config.crop_size).all(axis=1)
    assert area.sum() > 20 and (~area).sum() > 20
    # OpenCV's two-tap path (11-bit fixed point, its SIMD rounding) is reproduced to the bit; its area path sums
    # in float as the graph does, in another order: a sum at .5 can round the other way
    assert (levels[area] > 0.5).mean() < 1e-4 and levels[~area].max() == 0


@pytest.fixture(scope="module")
def stage_run(detector_run, tmp_path_factory) -> Path:
    """The fine-tuned detector and a tiny MoE stage (4 experts, 16 wide, blend 0.9) trained for two epochs on
    `crop_training_set` of generated surfaces (ground truth, YOLO's hits and false positives; ~20 s)."""
    from core import MoEConfig
    from manufacturing.defects.crop_data import crop_training_set
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.moe_stage import CropMoEClassifier, CropMoEConfig, CropTrainingConfig
    from manufacturing.defects.synthetic import SyntheticConfig, write_synthetic_voc
    from manufacturing.defects.voc import read_voc_folder

    root = tmp_path_factory.mktemp("stage")
    (root / "run").mkdir()
    (root / "run" / "detector.pt").write_bytes((detector_run / "detector.pt").read_bytes())
    detector = YoloDetector.load(root / "run" / "detector.pt")
    records = read_voc_folder(write_synthetic_voc(root / "voc", SyntheticConfig(images=24, size=160, seed=5)))
    config = CropMoEConfig(num_classes=len(detector.names), channels=(8, 16),
                           moe=MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=32))
    crops, geometry, labels = crop_training_set(records, detector, list(detector.names), config, progress=False)
    # blend 0.9 (the stage's weight in the fused score; 0.5 by default): this short-trained stage then
    # re-classifies some of YOLO's boxes, so that the classes compared are the stage's, not YOLO's
    stage = CropMoEClassifier(config=config, training=CropTrainingConfig(epochs=2, batch_size=32, blend=0.9,
                                                                         progress=False))
    stage.fit(crops, geometry, labels).save(root / "run" / "moe_stage.pt", names=list(detector.names))
    return root / "run"


@pytest.fixture(scope="module")
def stage_bundle(stage_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage-bundle") / "b"
    return Path(build_bundle(stage_run, out, detector=DetectorOptions(
        conf=CONF, moe_stage=stage_run / "moe_stage.pt"))["bundle"])


@pytest.mark.slow
def test_detector_bundle_with_the_moe_stage_reproduces_predict_with_the_stage(stage_run, stage_bundle, frames):
    """One graph from the frames to the re-scored detections, against DefectInspector with the stage
    (`defects predict --moe-stage`): on the test vectors and on further frames, cut to other sizes."""
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.moe_stage import CropMoEClassifier
    from manufacturing.defects.pipeline import DefectInspector, InspectionConfig

    stage, _ = CropMoEClassifier.load(stage_run / "moe_stage.pt")
    inspector = DefectInspector(detector=YoloDetector.load(stage_run / "detector.pt"), second_stage=stage,
                                config=InspectionConfig(conf=CONF))
    yolo = DefectInspector(detector=inspector.detector, config=InspectionConfig(conf=CONF))
    card = json.loads((stage_bundle / "card.json").read_text())
    assert card["model"]["second_stage_in_graph"] and "is IN the graph" in card["model"]["second_stage"]
    # crops by MatMul, the experts' sparse dispatch (NonZero), the second NMS, all in the one graph
    assert {"MatMul", "GatherElements", "NonZero", "NonMaxSuppression"} <= set(card["graph"]["operators"])
    vectors = json.loads((stage_bundle / "test_vectors.json").read_text())
    frames_in = np.asarray(vectors["inputs"]["image"], np.uint8)
    got, want = run_graph(stage_bundle / "model.onnx", {"image": frames_in}), inspector_outputs(inspector, frames_in)
    assert [got[n].shape for n in OUTPUTS] == [want[n].shape for n in OUTPUTS] and len(want["scores"]) >= 3
    np.testing.assert_array_equal(got["classes"], want["classes"])
    np.testing.assert_array_equal(got["image_index"], want["image_index"])
    # the stage changed what YOLO alone reports (else this would test nothing of it)
    alone = inspector_outputs(yolo, frames_in)
    assert alone["scores"].shape != want["scores"].shape or (
        np.abs(alone["scores"] - want["scores"]).max() > 1e-2 and (alone["classes"] != want["classes"]).any())
    parity = card["runtime"]["measured_parity"]
    assert parity["classes_identical"] and parity["detections"] == len(want["scores"])
    for name in ("scores", "boxes"):
        error = float(np.abs(got[name] - want[name]).max())
        assert error <= TOLERANCES[name] and error == pytest.approx(parity[f"{name}_max_abs_diff"], abs=1e-9)
    # widths and heights (mm) to the detector bundle's tolerance; the area column to the one the boxes imply
    np.testing.assert_allclose(got["sizes_mm"][:, :2], want["sizes_mm"][:, :2], rtol=0, atol=TOLERANCES["sizes_mm"])
    assert parity["sizes_mm_max_abs_diff"] <= card["runtime"]["tolerances"]["sizes_mm"]
    assert {k: v for k, v in card["runtime"]["tolerances"].items() if k != "sizes_mm"} == {
        k: v for k, v in TOLERANCES.items() if k != "sizes_mm"}
    compared = 0
    for height, width in ((200, 200), (160, 180)):
        rgb = np.stack([f[:height, :width, ::-1] for f in frames])
        got = _above(run_graph(stage_bundle / "model.onnx", {"image": rgb}), 1.5 * CONF)
        want = _above(inspector_outputs(inspector, rgb), 1.5 * CONF)
        assert [got[name].shape for name in OUTPUTS] == [want[name].shape for name in OUTPUTS], (height, width)
        np.testing.assert_array_equal(got["classes"], want["classes"])
        for name in ("boxes", "scores"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCES[name])
        compared += len(want["scores"])
    assert compared >= 6
    assert verify_bundle(stage_bundle)["test_vectors"] == vectors["rows"]


def _partners_reproduce(bundle: Path, partner_python: Path, partner_node: Path) -> None:
    """The Python (fresh venv) and Node partner scripts check the bundle's test vectors."""
    env = {**os.environ, "NODE_PATH": str(partner_node)}
    for command, extra in (([str(partner_python), str(PARTNER / "bundle_partner.py")], {}),
                           (["node", str(PARTNER / "bundle_partner.js")], {"env": env})):
        run = subprocess.run([*command, str(bundle)], capture_output=True, text=True, timeout=120, **extra)
        assert run.returncode == 0, run.stdout + run.stderr
        result = json.loads(run.stdout)
        assert result["problems"] == [] and result["family"] == "defects/yolo-detector"


@pytest.mark.slow
def test_partners_run_the_detector_bundle_with_the_moe_stage(stage_bundle, partner_python, partner_node):
    _partners_reproduce(stage_bundle, partner_python, partner_node)


@pytest.fixture(scope="module")
def detector_bundle(detector_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("detector-bundle") / "b"
    return Path(build_bundle(detector_run, out, detector=DetectorOptions(conf=CONF))["bundle"])


@pytest.mark.slow
def test_partners_reproduce_the_detector_test_vectors(detector_bundle, partner_python, partner_node):
    _partners_reproduce(detector_bundle, partner_python, partner_node)
