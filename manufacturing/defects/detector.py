"""A trained YOLO detector run from PyTorch (.pt) or onnxruntime (.onnx) with one pre/post-processing.

Both backends take the same letterboxed (batch, 3, S, S) input and return the head's decoded
output (batch, 4 + classes, anchors): boxes as (cx, cy, w, h) in input pixels, then per-class
sigmoid scores. Non-maximum suppression and the mapping back to image pixels are shared, so
PyTorch, ONNX and INT8 ONNX results differ only by what the backends compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision

from manufacturing.defects.errors import DefectDataError, one_line

PAD_VALUE = 114  # ultralytics' letterbox grey, so the detector sees what it was trained on


@dataclass
class Detections:
    """Detections of one image: boxes (n, 4) xyxy image pixels, scores (n,), classes (n,) int64,
    class_scores (n, classes) the detector's per-class scores of each box (for a second stage)."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    class_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> Detections:
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep],
                          None if self.class_scores is None else self.class_scores[keep])


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect and pad to (size, size); returns (image, scale, (pad_x, pad_y))."""
    h, w = image.shape[:2]
    scale = min(size / h, size / w)
    nh, nw = round(h * scale), round(w * scale)
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else image
    pad_x, pad_y = (size - nw) / 2, (size - nh) / 2
    top, left = round(pad_y - 0.1), round(pad_x - 0.1)
    out = cv2.copyMakeBorder(resized, top, size - nh - top, left, size - nw - left, cv2.BORDER_CONSTANT,
                             value=(PAD_VALUE,) * 3)
    return out, scale, (left, top)


def to_input(images: list[np.ndarray], size: int) -> tuple[np.ndarray, list[tuple[float, tuple[float, float]]]]:
    """BGR uint8 images -> (batch, 3, size, size) float32 RGB in [0, 1], plus each image's letterbox."""
    batch, frames = [], []
    for image in images:
        boxed, scale, pad = letterbox(image, size)
        batch.append(boxed[:, :, ::-1].transpose(2, 0, 1))
        frames.append((scale, pad))
    return np.ascontiguousarray(np.stack(batch), dtype=np.float32) / 255.0, frames


def postprocess(raw: np.ndarray, frames, image_shapes, *, conf: float, iou: float, max_det: int,
                multi_label: bool = False) -> list[Detections]:
    """(batch, 4 + classes, anchors) head output -> per-image Detections in image pixels (class-wise NMS).

    `multi_label`: an anchor proposes every class scoring above `conf`, not only its best one, as
    ultralytics' validator does; it raises recall where classes are confused (mAP evaluation).
    """
    results = []
    for pred, (scale, (pad_x, pad_y)), (h, w) in zip(torch.from_numpy(np.asarray(raw, np.float32)), frames,
                                                    image_shapes, strict=True):
        pred = pred.t()  # (anchors, 4 + classes)
        if multi_label:
            anchor, classes = (pred[:, 4:] > conf).nonzero(as_tuple=True)
            pred, scores = pred[anchor], pred[anchor, 4 + classes]
        else:
            scores, classes = pred[:, 4:].max(dim=1)
            keep = scores > conf
            pred, scores, classes = pred[keep], scores[keep], classes[keep]
        class_scores = pred[:, 4:]
        cx, cy, bw, bh = pred[:, :4].unbind(1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        kept = torchvision.ops.batched_nms(boxes, scores, classes, iou)[:max_det]
        boxes = (boxes[kept] - torch.tensor([pad_x, pad_y, pad_x, pad_y])) / scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        results.append(Detections(boxes.numpy(), scores[kept].numpy(), classes[kept].numpy().astype(np.int64),
                                  class_scores[kept].numpy()))
    return results


class HeadOutput(torch.nn.Module):
    """An ultralytics DetectionModel reduced to its decoded head output (batch, 4 + classes, anchors)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out[0] if isinstance(out, tuple | list) else out


class YoloDetector:
    """A trained detector; `names` are its classes, `imgsz` its square input size.

    Load with `YoloDetector.load(path)` for .pt (ultralytics checkpoint) or .onnx files.
    """

    def __init__(self, *, names: list[str], imgsz: int, module: torch.nn.Module | None = None,
                 session=None, path: Path | None = None) -> None:
        assert (module is None) != (session is None), "give a torch module or an onnxruntime session"
        self.names, self.imgsz, self.module, self.session, self.path = names, imgsz, module, session, path

    @property
    def backend(self) -> str:
        return "pytorch" if self.module is not None else "onnxruntime"

    @classmethod
    def load(cls, path: str | Path, *, imgsz: int | None = None, threads: int | None = None) -> YoloDetector:
        path = Path(path)
        if not path.is_file():
            raise DefectDataError(f"{path}: no such model file")
        if path.suffix == ".onnx":
            from core.onnx_export import inference_session

            try:
                session = inference_session(path, threads=threads)
            except Exception as error:  # onnxruntime raises its own types for unreadable models
                raise DefectDataError(f"{path}: not a readable ONNX model ({one_line(error)})") from None
            meta = session.get_modelmeta().custom_metadata_map
            if "names" not in meta or "imgsz" not in meta:
                raise DefectDataError(f"{path}: ONNX metadata lacks field 'names' or 'imgsz' (not a moeworks export)")
            return cls(names=json.loads(meta["names"]), imgsz=imgsz or int(meta["imgsz"]), session=session,
                       path=path)
        from manufacturing.defects.offline import ultralytics_offline

        ultralytics_offline()
        from ultralytics import YOLO

        try:
            yolo = YOLO(str(path), task="detect")
        except Exception as error:  # ultralytics raises many types for a file that is not a checkpoint
            raise DefectDataError(f"{path}: not a readable YOLO checkpoint ({one_line(error)})") from None
        if not isinstance(yolo.model, torch.nn.Module):  # e.g. an image path: ultralytics keeps it as a string
            raise DefectDataError(f"{path}: not a YOLO checkpoint (.pt) or moeworks ONNX export (.onnx)")
        model = yolo.model.float().fuse().eval() if hasattr(yolo.model, "fuse") else yolo.model.float().eval()
        trained = (getattr(yolo, "ckpt", None) or {}).get("train_args", {}) or {}
        size = imgsz or int(trained.get("imgsz", 640))
        names = [model.names[i] for i in sorted(model.names)]
        return cls(names=names, imgsz=size, module=HeadOutput(model).eval(), path=path)

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """(batch, 3, S, S) float32 -> (batch, 4 + classes, anchors) float32."""
        if self.module is not None:
            with torch.inference_mode():
                return self.module(torch.from_numpy(batch)).numpy()
        model_input = self.session.get_inputs()[0]
        if isinstance(model_input.shape[0], int) and model_input.shape[0] != len(batch):
            # The export pinned the batch (ultralytics' head caches anchors per shape): one image at a time.
            return np.concatenate([self.session.run(None, {model_input.name: batch[i:i + 1]})[0]
                                   for i in range(len(batch))])
        return self.session.run(None, {model_input.name: batch})[0]

    def detect(self, images: list[np.ndarray], *, conf: float = 0.25, iou: float = 0.7,
               max_det: int = 300, batch_size: int = 16, multi_label: bool = False) -> list[Detections]:
        """BGR uint8 images (any size; each is letterboxed to imgsz) -> one Detections per image."""
        results: list[Detections] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch, frames = to_input(chunk, self.imgsz)
            results += postprocess(self.raw(batch), frames, [im.shape[:2] for im in chunk],
                                   conf=conf, iou=iou, max_det=max_det, multi_label=multi_label)
        return results
