"""Channel pruning of the YOLO detector (manufacturing.defects.pruning): a YOLO11n built from its
YAML (random weights, 64 px) loses parameters, its C2f rewrite computes what C2f computed, the pruned
detector file reloads weights-only with the same outputs and exports to ONNX, and a width record
that is not one is refused."""

import copy
import json

import numpy as np
import pytest
import torch

from manufacturing.defects.detector import DETECTOR_KIND, HeadOutput, YoloDetector, training_model
from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.offline import ultralytics_offline
from manufacturing.defects.pruning import (
    PRUNED_KEY,
    SplitC2f,
    apply_widths,
    prune_detector,
    save_pruned,
    split_c2f,
)

NAMES = ["a", "b", "c"]
SIZE = 64


def tiny_detector(path, names=tuple(NAMES)):
    """A weights-only detector file of YOLO11n (random weights, SIZE px), as save_detector writes one."""
    from core.trainer import save_checkpoint

    ultralytics_offline()
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    torch.manual_seed(0)
    cfg = json.loads(json.dumps(yaml_model_load("yolo11n.yaml")))
    cfg["nc"] = len(names)
    cfg["yaml_file"] = "yolo11n.yaml"
    model = DetectionModel(copy.deepcopy(cfg), nc=len(names), verbose=False)
    for module in model.modules():  # non-trivial batch-norm statistics, so that a wrong channel shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return save_checkpoint(path, model, config=cfg, extra={"kind": DETECTOR_KIND, "names": list(names), "imgsz": SIZE})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_detector(tmp_path_factory.mktemp("prune") / "detector.pt")


def _outputs(module, images):
    with torch.inference_mode():
        return HeadOutput(module.eval())(images)


def test_split_c2f_computes_what_c2f_computed(source):
    model, _ = training_model(source)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    before = _outputs(model, images)
    split = split_c2f(copy.deepcopy(model))
    assert any(isinstance(m, SplitC2f) for m in split.modules())
    torch.testing.assert_close(_outputs(split, images), before, rtol=0, atol=1e-5)


def test_pruned_detector_is_smaller_and_reloads_weights_only_with_equal_outputs(source, tmp_path):
    model, metadata = training_model(source)
    counts = prune_detector(model, ratio=0.35, imgsz=SIZE)
    assert counts["parameters_after"] < 0.6 * counts["parameters_before"]
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    expected = _outputs(model, images)
    assert expected.shape == (3, 4 + len(NAMES), (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2)
    path = save_pruned(model, tmp_path / "detector.pt", config=metadata["config"], names=NAMES, imgsz=SIZE,
                       half=False)
    stored = torch.load(path, weights_only=True)  # nothing but tensors and JSON: the widths are numbers
    assert stored["metadata"][PRUNED_KEY]["conv"] and stored["metadata"]["config"] == metadata["config"]
    reloaded, _ = training_model(path)
    assert sum(p.numel() for p in reloaded.parameters()) == counts["parameters_after"]
    torch.testing.assert_close(_outputs(reloaded, images), expected, rtol=0, atol=1e-5)
    detector = YoloDetector.load(path)  # fused, as serving and `defects evaluate` load it
    torch.testing.assert_close(torch.from_numpy(detector.raw(images.numpy())), expected, rtol=1e-4, atol=1e-3)


def test_pruned_detector_exports_to_onnx_with_parity(source, tmp_path):
    from manufacturing.defects.export import export_detector_onnx

    model, metadata = training_model(source)
    prune_detector(model, ratio=0.5, imgsz=SIZE)
    path = save_pruned(model, tmp_path / "detector.pt", config=metadata["config"], names=NAMES, imgsz=SIZE,
                       half=False)
    detector = YoloDetector.load(path)
    onnx_path = export_detector_onnx(detector, tmp_path / "detector.onnx")
    exported = YoloDetector.load(onnx_path)
    batch = np.random.default_rng(3).random((2, 3, SIZE, SIZE), dtype=np.float32)
    np.testing.assert_allclose(exported.raw(batch), detector.raw(batch), rtol=1e-4, atol=1e-3)


def test_a_width_record_that_is_not_one_is_refused(source):
    ultralytics_offline()
    from ultralytics.nn.tasks import DetectionModel

    _, metadata = training_model(source)
    good = {"format": 1, "conv": {"model.0.conv": [3, 8, 1]}, "bn": {"model.0.bn": [8]}}
    apply_widths(DetectionModel(copy.deepcopy(metadata["config"]), nc=3, verbose=False), good, "f")
    bad = [
        ({"format": 2, "conv": {}, "bn": {}}, "format"),
        ({"format": 1, "conv": {}}, "'format', 'conv' and 'bn'"),
        ({"format": 1, "conv": {"model.0.bn": [3, 8, 1]}, "bn": {}}, "not a Conv2d"),
        ({"format": 1, "conv": {"model.0.conv": [3, 10 ** 6, 1]}, "bn": {}}, "width in"),
        ({"format": 1, "conv": {"model.0.conv": [3, 8, 2]}, "bn": {}}, "groups"),
        ({"format": 1, "conv": {"__class__": [3, 8, 1]}, "bn": {}}, "not a Conv2d"),
        ({"format": 1, "conv": [], "bn": {}}, "map layer names"),
    ]
    for record, says in bad:
        model = DetectionModel(copy.deepcopy(metadata["config"]), nc=3, verbose=False)
        with pytest.raises(DefectDataError, match=says):
            apply_widths(model, record, "f")


def test_a_detector_file_whose_weights_do_not_fit_its_widths_is_refused(source, tmp_path):
    model, metadata = training_model(source)
    prune_detector(model, ratio=0.35, imgsz=SIZE)
    path = save_pruned(model, tmp_path / "detector.pt", config=metadata["config"], names=NAMES, imgsz=SIZE)
    payload = torch.load(path, weights_only=True)
    payload["metadata"][PRUNED_KEY]["conv"]["model.0.conv"][1] += 1
    torch.save(payload, path)
    with pytest.raises(DefectDataError, match="weights do not fit"):
        training_model(path)
