"""ONNX export of the detector (FP32 and INT8) with a parity check against PyTorch on real images."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from manufacturing.defects.detector import YoloDetector, to_input

# Parity tolerances, stated: FP32 ONNX vs PyTorch on the head's decoded output. Box coordinates are
# in input pixels (up to imgsz), so a float32 reassociation error of ~1e-5 relative is ~1e-2 px.
BOX_TOLERANCE_PX = 0.05
SCORE_TOLERANCE = 1e-4


def export_detector_onnx(detector: YoloDetector, path: str | Path) -> Path:
    """Export a PyTorch detector to ONNX (dynamic batch) with its class names and input size as metadata."""
    from core.onnx_export import export_onnx

    assert detector.module is not None, "export needs the PyTorch detector"
    example = torch.zeros(1, 3, detector.imgsz, detector.imgsz)
    # Batch 1: the head computes its anchors from the traced shape, which pins the batch axis anyway.
    return export_onnx(detector.module, (example,), path, input_names=["images"], output_names=["head"],
                       dynamic_batch=False,
                       metadata={"names": detector.names, "imgsz": detector.imgsz,
                                 "output": "(batch, 4 + classes, anchors): cx, cy, w, h in input px, "
                                           "then per-class sigmoid scores"})


class _ImageReader:
    """onnxruntime's CalibrationDataReader over a list of images, one at a time."""

    def __init__(self, images: list[np.ndarray], imgsz: int, input_name: str) -> None:
        self._batches = iter([{input_name: to_input([image], imgsz)[0]} for image in images])

    def get_next(self):
        return next(self._batches, None)


def quantize_detector_int8(onnx_path: str | Path, out_path: str | Path, calibration_images: list[np.ndarray],
                           imgsz: int) -> Path:
    """Static INT8 (QDQ, per-channel weights, calibrated activations) for CPU and edge runtimes.

    The head's last nodes (box decoding in pixels, concatenated with 0-1 scores) are kept in
    float: one int8 scale cannot cover both ranges, and quantizing them ruins the boxes.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    prepared = out_path.with_suffix(".prep.onnx")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    # Everything after the last convolutions: DFL softmax, anchor decoding, sigmoid, concat.
    last_conv = max(i for i, node in enumerate(model.graph.node) if node.op_type == "Conv")
    keep_float = [node.name for node in model.graph.node[last_conv + 1:]]
    reader = _ImageReader(calibration_images, imgsz, model.graph.input[0].name)
    metadata = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=keep_float)
    prepared.unlink(missing_ok=True)
    quantized = onnx.load(str(out_path))
    for key, value in metadata.items():
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(quantized, str(out_path))
    return out_path


@dataclass
class Parity:
    images: int
    max_box_difference_px: float  # over all anchors with a score above 0.01 in PyTorch
    max_score_difference: float  # over all anchors and classes
    box_tolerance_px: float = BOX_TOLERANCE_PX
    score_tolerance: float = SCORE_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_box_difference_px <= self.box_tolerance_px and self.max_score_difference <= self.score_tolerance


def detector_parity(torch_detector: YoloDetector, onnx_detector: YoloDetector, images: list[np.ndarray]) -> Parity:
    """Compare the two backends' head outputs on the same real images."""
    batch, _ = to_input(images, torch_detector.imgsz)
    eager, ort = torch_detector.raw(batch), onnx_detector.raw(batch)
    confident = eager[:, 4:].max(axis=1) > 0.01  # (batch, anchors): boxes of near-zero score never matter
    box_diff = np.abs(eager[:, :4] - ort[:, :4]).max(axis=1)[confident]
    return Parity(len(images), float(box_diff.max()) if box_diff.size else 0.0,
                  float(np.abs(eager[:, 4:] - ort[:, 4:]).max()))
