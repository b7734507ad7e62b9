"""The MoE second stage: shapes, learning on generated crops, re-scoring, save/load, ONNX parity."""

import numpy as np
import pytest
import torch

from core import MoEConfig
from manufacturing.defects.detector import Detections
from manufacturing.defects.metrics import detection_metrics
from manufacturing.defects.moe_stage import (
    CropMoEClassifier,
    CropMoEConfig,
    CropMoENet,
    CropTrainingConfig,
    crops_and_geometry,
)
from manufacturing.defects.synthetic import SYNTHETIC_CLASSES, planted_image

SMALL = CropMoEConfig(num_classes=len(SYNTHETIC_CLASSES), crop_size=32, channels=(8, 16),
                      moe=MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32))


def _generated_crops(images: int, seed: int):
    """Ground-truth crops of planted defects plus random background crops (label = num_classes)."""
    rng = np.random.default_rng(seed)
    crops, geometry, labels = [], [], []
    for _ in range(images):
        image, boxes, names = planted_image(rng, 96, 2)
        image = np.repeat(image[:, :, None], 3, axis=2)
        x = rng.uniform(0, 60, 2)
        background = np.array([[x[0], x[1], x[0] + 24, x[1] + 24]], np.float32)
        c, g = crops_and_geometry(image, np.concatenate([boxes, background]), SMALL)
        crops.append(c)
        geometry.append(g)
        labels += [SYNTHETIC_CLASSES.index(n) for n in names] + [len(SYNTHETIC_CLASSES)]
    return np.concatenate(crops), np.concatenate(geometry), np.array(labels, np.int64)


def test_network_shapes_and_aux_loss_backward():
    net = CropMoENet(SMALL)
    logits, aux = net(torch.rand(5, 3, 32, 32), torch.randn(5, 3))
    assert logits.shape == (5, len(SYNTHETIC_CLASSES) + 1) and aux.ndim == 0
    (logits.sum() + aux).backward()
    assert net.moe.router.gate.weight.grad is not None
    assert all(p.grad is not None for p in net.stem.parameters())


def test_crops_keep_the_box_and_geometry():
    image = np.zeros((100, 200, 3), np.uint8)
    image[20:40, 50:150] = 255
    crops, geometry = crops_and_geometry(image, np.array([[50, 20, 150, 40]]), CropMoEConfig(context=0.0))
    assert crops.shape == (1, 3, 64, 64) and crops.min() > 0.99
    np.testing.assert_allclose(geometry[0], [np.log(0.5), np.log(0.2), np.log(5)], rtol=1e-5)


@pytest.fixture(scope="module")
def fitted():
    crops, geometry, labels = _generated_crops(80, seed=0)
    stage = CropMoEClassifier(config=SMALL, training=CropTrainingConfig(epochs=6, batch_size=32, learning_rate=3e-3,
                                                                        progress=False))
    return stage.fit(crops, geometry, labels)


def test_stage_learns_generated_defect_classes(fitted):
    crops, geometry, labels = _generated_crops(30, seed=1)
    accuracy = (fitted.predict_proba(crops, geometry).argmax(1) == labels).mean()
    assert accuracy > 0.6, f"held-out accuracy {accuracy:.2f} (chance is 0.2)"
    assert fitted.best_epoch_ >= 1 and len(fitted.history_) >= 1


def test_rescoring_uses_the_stage_and_is_measurable(fitted):
    rng = np.random.default_rng(5)
    predictions, truth = [], []
    for _ in range(20):
        image, boxes, names = planted_image(rng, 96, 2)
        image = np.repeat(image[:, :, None], 3, axis=2)
        classes = np.array([SYNTHETIC_CLASSES.index(n) for n in names])
        # A detector that finds every box but is unsure of the class: uniform class scores.
        scores = np.full((len(boxes), len(SYNTHETIC_CLASSES)), 0.5, np.float32)
        dets = Detections(boxes, scores.max(1), np.zeros(len(boxes), np.int64), scores)
        predictions.append(fitted.rescore(image, dets))
        truth.append((boxes, classes))
    rescored = detection_metrics(predictions, truth, list(SYNTHETIC_CLASSES))
    assert rescored["mAP50"] > 0.5, rescored


def test_save_load_and_onnx_parity_at_any_batch(fitted, tmp_path):
    import onnx

    from manufacturing.defects.export import export_moe_stage_onnx, moe_stage_parity

    path = fitted.save(tmp_path / "moe.pt", names=list(SYNTHETIC_CLASSES))
    loaded, names = CropMoEClassifier.load(path)
    crops, geometry, _ = _generated_crops(6, seed=2)
    np.testing.assert_allclose(loaded.predict_proba(crops, geometry), fitted.predict_proba(crops, geometry), atol=1e-6)
    assert names == list(SYNTHETIC_CLASSES)
    # Exported from 5 crops; run at 1, 3 and all of the 18 crops: the batch axis is free.
    onnx_path = export_moe_stage_onnx(loaded, tmp_path / "moe.onnx", crops[:5], geometry[:5], names=names)
    proto = onnx.load(str(onnx_path))
    assert [i.name for i in proto.graph.input] == ["crops", "geometry"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    assert {p.key for p in proto.metadata_props} >= {"name", "version", "names", "config", "training"}
    onnx_stage, onnx_names = CropMoEClassifier.load(onnx_path)
    assert onnx_names == names and onnx_stage.training.blend == loaded.training.blend
    parity = moe_stage_parity(loaded, onnx_stage, crops, geometry, batch_sizes=(1, 3, len(crops)))
    assert parity["passed"] and parity["max_probability_difference"] < 1e-4 and parity["crops"] == len(crops)
    image, boxes, _ = planted_image(np.random.default_rng(9), 96, 3)
    image = np.repeat(image[:, :, None], 3, axis=2)
    scores = np.full((len(boxes), len(SYNTHETIC_CLASSES)), 0.5, np.float32)
    dets = Detections(boxes, scores.max(1), np.zeros(len(boxes), np.int64), scores)
    eager, ort = loaded.rescore(image, dets), onnx_stage.rescore(image, dets)
    np.testing.assert_array_equal(eager.classes, ort.classes)
    np.testing.assert_allclose(eager.scores, ort.scores, atol=1e-4)
