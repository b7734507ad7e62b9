"""The detector's static INT8 export on a real YOLO11n graph (built from yolo11n.yaml, untrained, 64 px):
which nodes the chosen recipe keeps in float, and that the INT8 file runs on any batch."""

import json

import numpy as np
import onnx
import pytest

from manufacturing.defects.detector import HeadOutput, YoloDetector
from manufacturing.defects.export import Int8Recipe, export_detector_onnx, float_nodes, quantize_detector_int8
from manufacturing.defects.offline import ultralytics_offline

NAMES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
# The Detect head's output convolutions (box distributions cv2.<scale>.2, class logits cv3.<scale>.2)
# and the DFL's fixed convolution: the nodes the "outputs" recipe keeps in float.
HEAD_OUTPUT_WEIGHTS = {f"model.model.23.{branch}.{scale}.2.weight" for branch in ("cv2", "cv3") for scale in range(3)}
DFL_WEIGHT = "model.model.23.dfl.conv.weight"


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("int8")
    ultralytics_offline(folder / "ultralytics-config")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=len(NAMES), verbose=False).fuse(verbose=False).eval()
    detector = YoloDetector(names=NAMES, imgsz=64, module=HeadOutput(model).eval())
    return export_detector_onnx(detector, folder / "detector.onnx"), detector


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (200, 200, 3), dtype=np.uint8) for _ in range(count)]


def _conv_weights(model):
    """Conv node name -> (its weight's initializer name, whether the weight is dequantized INT8)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    weights = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            source = producers.get(node.input[1])
            quantized = source is not None and source.op_type == "DequantizeLinear"
            weights[node.name] = (source.input[0] if quantized else node.input[1], quantized)
    return weights


def test_default_recipe_keeps_the_head_outputs_and_dfl_in_float_and_quantizes_every_other_conv(fp32_onnx, tmp_path):
    path, detector = fp32_onnx
    int8_path = quantize_detector_int8(path, tmp_path / "detector.int8.onnx", _images(4), 64)
    model = onnx.load(str(int8_path))
    weights = _conv_weights(model)
    float_convs = {weight for weight, quantized in weights.values() if not quantized}
    assert float_convs == HEAD_OUTPUT_WEIGHTS | {DFL_WEIGHT}
    assert sum(quantized for _, quantized in weights.values()) == len(weights) - 7 > 70
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["quantization"] == f"{Int8Recipe().describe()}, 4 calibration images"
    kept = json.loads(meta["float_nodes"])
    assert {n.name for n in model.graph.node if n.op_type == "Conv" and not weights[n.name][1]} <= set(kept)
    # The float tail ends at the output: the decoded boxes and sigmoid scores come out of float nodes.
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in model.graph.node if n.name in kept}
    # Any batch, each image as it is alone; scores stay probabilities.
    int8 = YoloDetector.load(int8_path)
    batch = np.random.default_rng(1).random((3, 3, 64, 64), dtype=np.float32)
    together = int8.raw(batch)
    assert together.shape == detector.raw(batch).shape
    np.testing.assert_allclose(together, np.concatenate([int8.raw(batch[i:i + 1]) for i in range(3)]), atol=1e-4)
    assert (together[:, 4:] >= 0).all() and (together[:, 4:] <= 1).all()


def test_float_parts_by_recipe_on_the_prepared_graph(fp32_onnx):
    path, _ = fp32_onnx
    model = onnx.load(str(path))
    by_name = {n.name: n for n in model.graph.node}
    decode = float_nodes(model, "decode")
    outputs = float_nodes(model, "outputs")
    assert set(decode) < set(outputs)
    assert not [n for n in decode if by_name[n].op_type == "Conv"], "decode: only what follows the DFL"
    assert {by_name[n].input[1] for n in outputs if by_name[n].op_type == "Conv"} == HEAD_OUTPUT_WEIGHTS | {DFL_WEIGHT}
    assert by_name[outputs[-1]].output[0] == model.graph.output[0].name
    with pytest.raises(AssertionError, match="keep_float"):
        float_nodes(model, "everything")
