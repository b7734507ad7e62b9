"""A trained YOLO detector run from PyTorch (.pt) or onnxruntime (.onnx) with one pre/post-processing.

The .pt is ours, not ultralytics': an ultralytics checkpoint is a full pickle (loading one runs
whatever it names), so `defects train` converts its best.pt, in the process that wrote it, into a
weights-only checkpoint (core.trainer.save_checkpoint): the state dict plus the model YAML, class
names and input size as JSON. Loading rebuilds ultralytics' DetectionModel from the YAML, after
checking that it names only known layers (ultralytics' YAML parser calls what it names and evals
an `activation` string), and loads the weights. Nothing else is accepted. A channel-pruned
detector (`moeworks compress prune`) also stores the widths of the layers it narrowed, as JSON
numbers (manufacturing.defects.pruning), which are applied to the built model before its weights.

Both backends take the same letterboxed (batch, 3, S, S) input and return the head's decoded
output (batch, 4 + classes, anchors): boxes as (cx, cy, w, h) in input pixels, then per-class
sigmoid scores. Non-maximum suppression and the mapping back to image pixels are shared, so
PyTorch, ONNX and INT8 ONNX results differ only by what the backends compute.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torchvision

from manufacturing.defects.errors import DefectDataError, one_line
from manufacturing.defects.pruning import PRUNED_KEY, SplitC2f, apply_widths, yaml_record

PAD_VALUE = 114  # ultralytics' letterbox grey, so the detector sees what it was trained on
DETECTOR_KIND = "moeworks.defects.yolo"
# Model-YAML keys ultralytics' detection YAMLs use; anything else is refused rather than guessed at.
YAML_KEYS = {"nc", "scales", "scale", "backbone", "head", "depth_multiple", "width_multiple", "yaml_file", "ch",
             "channels", "reg_max", "end2end", "kpt_shape", "activation"}
# The `activation` values of ultralytics' own YAMLs; the parser evals this string, so only these pass.
ACTIVATIONS = {"nn.SiLU()", "nn.ReLU()", "nn.LeakyReLU(0.1)", "nn.Hardswish()", "torch.nn.SiLU()"}
# Bounds on what a model YAML may ask the builder to allocate (the weights are checked against the
# built model only after it is built). ultralytics' detection YAMLs: <= 30 layer entries, repeats
# <= 9, channel arguments <= 1024, scale multipliers <= 1.5, max_channels <= 1024.
MAX_LAYERS = 64
MAX_REPEATS = 16
MAX_NUMBER = 4096  # any number in a layer's arguments or in `scales`
MAX_MULTIPLIER = 2.0  # depth and width multipliers


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


def check_model_yaml(cfg: Any, where: str) -> dict:
    """A detection model YAML (as a dict) that names only ultralytics' layer classes and torch.nn
    modules, with plain JSON arguments; a copy of it. DefectDataError naming the first offence.

    ultralytics' parser resolves each layer's module name in its own module namespace (which also
    holds functions that load full pickles) and calls it with the YAML's arguments, and evals the
    `activation` string: a checkpoint's YAML is outside input and is checked before it is built.
    """
    import ultralytics.nn.modules as layers

    def plain(value: Any, depth: int = 0) -> bool:
        if depth > 4:
            return False
        if isinstance(value, list):
            return len(value) <= 64 and all(plain(v, depth + 1) for v in value)
        if isinstance(value, bool | int | float):
            return abs(value) <= MAX_NUMBER
        return value is None or (isinstance(value, str) and len(value) <= 64)

    if not isinstance(cfg, dict):
        raise DefectDataError(f"{where}: field 'config' (the model YAML) is not an object")
    unknown = sorted(set(cfg) - YAML_KEYS)
    if unknown:
        raise DefectDataError(f"{where}: model YAML key {unknown[0]!r} is not one of ultralytics' detection YAML keys")
    if "activation" in cfg and cfg["activation"] not in ACTIVATIONS:
        raise DefectDataError(f"{where}: model YAML 'activation' must be one of {sorted(ACTIVATIONS)}")
    if not (isinstance(cfg.get("nc"), int) and 1 <= cfg["nc"] <= 1000):
        raise DefectDataError(f"{where}: model YAML 'nc' must be an integer class count in [1, 1000]")
    for key in ("scales", "scale", "depth_multiple", "width_multiple", "reg_max", "ch", "channels", "yaml_file",
                "end2end", "kpt_shape"):
        value = cfg.get(key)
        if key == "scales" and value is not None:
            if not (isinstance(value, dict) and len(value) <= 16 and all(
                    isinstance(k, str) and isinstance(v, list) and plain(v) for k, v in value.items())):
                raise DefectDataError(f"{where}: model YAML 'scales' must map scale names to lists of numbers")
            if not all(len(v) == 3 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
                       and 0 < v[0] <= MAX_MULTIPLIER and 0 < v[1] <= MAX_MULTIPLIER for v in value.values()):
                raise DefectDataError(f"{where}: model YAML 'scales' entries must be [depth <= {MAX_MULTIPLIER}, "
                                      f"width <= {MAX_MULTIPLIER}, max_channels]")
        elif not plain(value):
            raise DefectDataError(f"{where}: model YAML {key!r} must be a number, string or list (within bounds)")
        elif key in ("depth_multiple", "width_multiple") and value is not None and not (
                isinstance(value, int | float) and 0 < value <= MAX_MULTIPLIER):
            raise DefectDataError(f"{where}: model YAML {key!r} must be in (0, {MAX_MULTIPLIER}]")
    entries = []
    for part in ("backbone", "head"):
        if not isinstance(cfg.get(part), list):
            raise DefectDataError(f"{where}: model YAML {part!r} must be a list of layers")
        entries += cfg[part]
    if not 1 <= len(entries) <= MAX_LAYERS:
        raise DefectDataError(f"{where}: model YAML has {len(entries)} layers; 1 to {MAX_LAYERS} allowed")
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 4 and plain(entry[0]) and isinstance(entry[1], int)
                and 1 <= entry[1] <= MAX_REPEATS and isinstance(entry[2], str) and isinstance(entry[3], list)
                and plain(entry[3])):
            raise DefectDataError(f"{where}: model YAML layer {i} is not [from, repeats, module, args]")
        name = entry[2]
        if name.startswith("nn."):
            module = getattr(torch.nn, name[3:], None)
        else:
            module = getattr(layers, name, None) if name in layers.__all__ else None
        if not (isinstance(module, type) and issubclass(module, torch.nn.Module)):
            raise DefectDataError(f"{where}: model YAML layer {i} names {name[:64]!r}, not an ultralytics or "
                                  "torch.nn layer class")
    return copy.deepcopy(cfg)


def save_detector(weights: str | Path, path: str | Path, *, metrics: dict | None = None) -> Path:
    """Convert ultralytics' training checkpoint `weights` (a full pickle this process wrote) into
    our weights-only detector file at `path`: state dict + model YAML, names, imgsz (+ training
    history and metrics). Call it only on a file this process created."""
    from core.trainer import save_checkpoint
    from manufacturing.defects.offline import ultralytics_offline

    ultralytics_offline()
    from ultralytics import YOLO

    yolo = YOLO(str(weights), task="detect")
    model = yolo.model.float()
    names = [model.names[i] for i in sorted(model.names)]
    ckpt = getattr(yolo, "ckpt", None) or {}
    trained = ckpt.get("train_args", {}) or {}
    cfg = json.loads(json.dumps(model.yaml))
    if isinstance(cfg.get("yaml_file"), str):  # where the YAML was read from: a name is all that is useful
        cfg["yaml_file"] = Path(cfg["yaml_file"]).name[:64]
    cfg = check_model_yaml(cfg, str(weights))
    if cfg["nc"] != len(names):
        raise DefectDataError(f"{weights}: model YAML says {cfg['nc']} classes, names has {len(names)}")
    size = int(trained.get("imgsz", 640))
    extra = {"kind": DETECTOR_KIND, "names": names, "imgsz": size, "train_results": ckpt.get("train_results") or {}}
    if any(isinstance(m, SplitC2f) for m in model.modules()):  # channel-pruned: its widths, beside the YAML
        extra[PRUNED_KEY] = yaml_record(model, cfg, len(names))
    # Stored in float16, as ultralytics stores its best.pt (so converting it loses nothing): half the
    # size of float32, which keeps a shipped YOLO11n under 6 MB. Loading casts back to float32.
    save_checkpoint(path, copy.deepcopy(model).half(), config=cfg, metrics=metrics or {}, extra=extra)
    # The rebuilt detector must compute what ultralytics' own model computes, before anything uses it.
    reference = HeadOutput(copy.deepcopy(model).fuse(verbose=False).eval())
    rebuilt, _ = YoloDetector._load_weights(Path(path))
    probe = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if not torch.allclose(reference(probe), HeadOutput(rebuilt)(probe), rtol=1e-5, atol=1e-4):
            raise RuntimeError(f"{path}: the rebuilt detector differs from ultralytics' {weights}")
    return Path(path)


class YoloDetector:
    """A trained detector; `names` are its classes, `imgsz` its square input size.

    Load with `YoloDetector.load(path)`: a detector file `defects train` wrote (.pt, weights only)
    or its ONNX export (.onnx). An ultralytics .pt (a full pickle) is refused, never unpickled.
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
        from core.model_files import ModelFilesError, verify_file

        path = Path(path)
        if not path.is_file():
            raise DefectDataError(f"{path}: no such model file")
        try:
            verify_file(path)  # against its folder's MANIFEST.json, when it has one
        except ModelFilesError as error:
            raise DefectDataError(str(error)) from None
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
        model, metadata = cls._load_weights(path)
        return cls(names=metadata["names"], imgsz=imgsz or metadata["imgsz"], module=HeadOutput(model).eval(),
                   path=path)

    @staticmethod
    def _load_weights(path: Path) -> tuple[torch.nn.Module, dict]:
        """The detector file's DetectionModel (fused, eval) and metadata, read weights-only."""
        model, metadata = training_model(path)
        return model.fuse(verbose=False).eval(), metadata

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


def training_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The detector file's ultralytics DetectionModel, unfused (trainable, as `defects train --weights`
    fine-tunes it), and its metadata; read weights-only, its YAML checked before it is built."""
    from core.trainer import CheckpointError, read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise DefectDataError(f"{path}: no such model file")
    with path.open("rb") as handle:
        head = handle.read(4)
    # torch writes a zip archive (older torch a bare pickle, protocol byte 0x80): anything else is no
    # checkpoint at all, and saying "pickle" about a photo would mislead
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise DefectDataError(f"{path}: not a YOLO checkpoint (.pt) or moeworks ONNX export (.onnx)")
    try:
        payload = read_checkpoint(path)
    except CheckpointError:
        raise DefectDataError(f"{path}: refused: not a weights-only detector file (a full pickle, such as an "
                              "ultralytics .pt, could run code and is never unpickled); use the detector.pt "
                              "`moeworks defects train` writes or its .onnx export") from None
    metadata = payload["metadata"]
    if metadata.get("kind") != DETECTOR_KIND:
        raise DefectDataError(f"{path}: field 'kind' is not {DETECTOR_KIND} (not a detector `moeworks defects "
                              "train` wrote)")
    names, size = metadata.get("names"), metadata.get("imgsz")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise DefectDataError(f"{path}: field 'names' must be a non-empty list of class names")
    if not (isinstance(size, int) and 32 <= size <= 8192 and size % 32 == 0):
        raise DefectDataError(f"{path}: field 'imgsz' must be a multiple of 32 in [32, 8192]")
    cfg = check_model_yaml(metadata.get("config"), str(path))
    if cfg["nc"] != len(names):
        raise DefectDataError(f"{path}: model YAML says {cfg['nc']} classes, field 'names' has {len(names)}")
    from manufacturing.defects.offline import ultralytics_offline

    ultralytics_offline()
    from ultralytics.nn.tasks import DetectionModel

    try:
        model = DetectionModel(cfg, nc=len(names), verbose=False)
    except Exception as error:  # noqa: BLE001 - a YAML that does not build
        raise DefectDataError(f"{path}: the model YAML does not build ({one_line(error)})") from None
    if PRUNED_KEY in metadata:  # a channel-pruned detector: narrow the layers the record names first
        apply_widths(model, metadata[PRUNED_KEY], str(path))
    try:
        model.load_state_dict(payload["state_dict"])
    except Exception as error:  # noqa: BLE001 - weights of another shape
        raise DefectDataError(f"{path}: the weights do not fit the model YAML ({one_line(error)})") from None
    model.names = dict(enumerate(names))
    return model.float(), metadata
