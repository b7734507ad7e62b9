"""Inspection: detector (tiled on large frames) -> optional MoE stage -> sizes in mm -> reports."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from manufacturing.defects.calibration import Calibration
from manufacturing.defects.dataset import load_image
from manufacturing.defects.detector import Detections, YoloDetector
from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.metrics import detection_metrics
from manufacturing.defects.moe_stage import CropMoEClassifier
from manufacturing.defects.tiling import TileConfig, detect_tiled
from manufacturing.defects.voc import IMAGE_SUFFIXES, VOCImage


@dataclass
class InspectionConfig:
    conf: float = 0.25  # reporting threshold; evaluation uses EVAL_CONF
    iou: float = 0.7  # NMS IoU, ultralytics' default
    max_det: int = 300
    tile_above: float = 2.0  # tile frames whose longer side exceeds this many detector inputs
    tiles: TileConfig = field(default_factory=TileConfig)


EVAL_CONF = 0.001  # mAP integrates the whole precision-recall curve: keep low-score boxes
EVAL_MAX_DET = 300  # per image, as ultralytics' validator (with multi-label boxes)


class DefectInspector:
    """Finds defects in BGR images and reports them with physical sizes.

    Args:
        detector: the YOLO stage.
        calibration: mm per pixel and the minimum size to report.
        second_stage: optional MoE stage that re-scores and re-classifies YOLO's boxes.
        config: thresholds and tiling.
    """

    def __init__(self, *, detector: YoloDetector, calibration: Calibration | None = None,
                 second_stage: CropMoEClassifier | None = None, config: InspectionConfig | None = None) -> None:
        self.detector = detector
        self.calibration = calibration or Calibration()
        self.second_stage = second_stage
        self.config = config or InspectionConfig()

    def detect(self, images: list[np.ndarray], *, conf: float | None = None, max_det: int | None = None,
               use_second_stage: bool = True, multi_label: bool = False) -> list[Detections]:
        cfg = self.config
        conf = cfg.conf if conf is None else conf
        max_det = max_det or cfg.max_det
        limit = cfg.tile_above * self.detector.imgsz
        small = [i for i, im in enumerate(images) if max(im.shape[:2]) <= limit]
        results: list[Detections | None] = [None] * len(images)
        for i, dets in zip(small, self.detector.detect([images[i] for i in small], conf=conf, iou=cfg.iou,
                                                       max_det=max_det, multi_label=multi_label), strict=True):
            results[i] = dets
        for i in set(range(len(images))) - set(small):
            results[i] = detect_tiled(self.detector, images[i], cfg.tiles, conf=conf, iou=cfg.iou, max_det=max_det)
        if self.second_stage is not None and use_second_stage:
            results = [self.second_stage.rescore(im, d, iou=cfg.iou) for im, d in zip(images, results, strict=True)]
            results = [d.select(d.scores >= conf) for d in results]
        return results

    def report(self, detections: Detections) -> list[dict]:
        """JSON-ready defects, largest score first, below the calibration's minimum size left out."""
        sizes = self.calibration.sizes_mm(detections.boxes)
        large = self.calibration.large_enough(detections.boxes)
        mm = np.array([self.calibration.mm_per_pixel_x, self.calibration.mm_per_pixel_y] * 2)
        return [{"class": self.detector.names[int(c)], "score": round(float(s), 4),
                 "box_px": [round(float(v), 1) for v in b], "box_mm": [round(float(v), 3) for v in b * mm],
                 "width_mm": round(float(z[0]), 3), "height_mm": round(float(z[1]), 3),
                 "area_mm2": round(float(z[2]), 3)}
                for b, s, c, z, ok in zip(detections.boxes, detections.scores, detections.classes, sizes, large,
                                          strict=True) if ok]


def draw(image: np.ndarray, defects: list[dict]) -> np.ndarray:
    """A copy of `image` with each defect's box, class, score and size in mm."""
    out = image.copy()
    palette = [(0, 0, 255), (0, 200, 0), (255, 0, 0), (0, 200, 255), (255, 0, 255), (255, 255, 0)]
    for d in defects:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box_px"])
        colour = palette[sum(map(ord, d["class"])) % len(palette)]  # stable across runs
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, 1)
        label = f"{d['class']} {d['score']:.2f} {d['width_mm']:.1f}x{d['height_mm']:.1f}mm"
        cv2.putText(out, label, (x1, max(9, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
    return out


def list_images(source: str | Path) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DefectDataError(f"{source}: no such image file or folder")
    images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DefectDataError(f"{source}: empty folder: no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def predict_to_folder(inspector: DefectInspector, source: str | Path, out_dir: str | Path, *,
                      progress: bool = True, annotate: bool = True) -> dict:
    """Detect on every image under `source`; write predictions.json and annotated images to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in tqdm(list_images(source), desc="predict", disable=not progress):
        image = load_image(path)
        defects = inspector.report(inspector.detect([image])[0])
        results.append({"image": str(path), "width_px": image.shape[1], "height_px": image.shape[0],
                        "defects": defects})
        if annotate:
            cv2.imwrite(str(out_dir / f"{path.stem}.annotated.jpg"), draw(image, defects))
    payload = {"model": str(inspector.detector.path), "second_stage": inspector.second_stage is not None,
               "calibration": inspector.calibration.to_dict(), "images": results}
    (out_dir / "predictions.json").write_text(json.dumps(payload, indent=1))
    return payload


def evaluate_records(inspector: DefectInspector, records: list[VOCImage], *, progress: bool = True) -> dict:
    """mAP and friends for YOLO alone and, with a second stage, for YOLO + MoE on the same boxes."""
    index = {name: i for i, name in enumerate(inspector.detector.names)}
    ground_truth, images = [], []
    for record in tqdm(records, desc="load", disable=not progress, leave=False):
        unknown = [label for label in record.labels if label not in index]
        if unknown:
            raise DefectDataError(f"{record.image_path}: field <name> {unknown[0]!r} is not a class of the model "
                                  f"({inspector.detector.names})")
        images.append(load_image(record.image_path, expected_size=(record.width, record.height)))
        ground_truth.append((record.boxes, np.array([index[label] for label in record.labels], np.int64)))
    yolo = inspector.detect(images, conf=EVAL_CONF, max_det=EVAL_MAX_DET, use_second_stage=False, multi_label=True)
    names = inspector.detector.names
    result = {"yolo": detection_metrics(yolo, ground_truth, names)}
    if inspector.second_stage is not None:
        rescored = [inspector.second_stage.rescore(im, d, iou=inspector.config.iou)
                    for im, d in tqdm(list(zip(images, yolo, strict=True)), desc="MoE stage",
                                      disable=not progress, leave=False)]
        result["yolo+moe"] = detection_metrics(rescored, ground_truth, names)
    return result
