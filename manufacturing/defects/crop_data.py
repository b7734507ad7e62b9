"""Training crops for the MoE stage: ground-truth boxes, YOLO's hits and YOLO's false positives."""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

from manufacturing.defects.dataset import load_image
from manufacturing.defects.detector import YoloDetector
from manufacturing.defects.moe_stage import CropMoEConfig, crops_and_geometry
from manufacturing.defects.voc import VOCImage


def _jitter(rng: np.random.Generator, boxes: np.ndarray, amount: float, width: int, height: int) -> np.ndarray:
    """Shift each side by up to `amount` of the box size: YOLO's boxes are never pixel-exact."""
    wh = boxes[:, 2:] - boxes[:, :2]
    size = np.concatenate([wh, wh], axis=1)
    moved = boxes + rng.uniform(-amount, amount, boxes.shape) * size
    moved[:, 0::2] = moved[:, 0::2].clip(0, width)
    moved[:, 1::2] = moved[:, 1::2].clip(0, height)
    moved[:, 2:] = np.maximum(moved[:, 2:], moved[:, :2] + 1)
    return moved


def crop_training_set(records: list[VOCImage], detector: YoloDetector, names: list[str], config: CropMoEConfig, *,
                      fp_conf: float = 0.05, fp_iou: float = 0.3, hit_iou: float = 0.5, max_fp_per_image: int = 8,
                      jitter_copies: int = 1, seed: int = 0,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops (n, 3, S, S), geometry (n, 3) and labels (n,) from annotated images.

    Per image: each ground-truth box (plus `jitter_copies` jittered copies) with its class; each
    YOLO box at score >= fp_conf that overlaps a ground truth by IoU >= hit_iou, with that class;
    and up to `max_fp_per_image` of YOLO's highest-scoring boxes that overlap no ground truth by
    more than fp_iou, labelled background (index len(names)).
    """
    rng = np.random.default_rng(seed)
    index = {name: i for i, name in enumerate(names)}
    background = len(names)
    crops, geometry, labels = [], [], []
    images = [load_image(r.image_path, expected_size=(r.width, r.height)) for r in records]
    found = detector.detect(images, conf=fp_conf)
    for record, image, dets in tqdm(list(zip(records, images, found, strict=True)), desc="crops",
                                    disable=not progress, leave=False):
        gt_classes = np.array([index[label] for label in record.labels], np.int64)
        boxes = [record.boxes] + [_jitter(rng, record.boxes, 0.1, record.width, record.height)
                                  for _ in range(jitter_copies)]
        box_labels = [gt_classes] * (1 + jitter_copies)
        if len(dets):
            iou = torchvision.ops.box_iou(torch.from_numpy(dets.boxes), torch.from_numpy(record.boxes)).numpy() \
                if len(record.boxes) else np.zeros((len(dets), 0), np.float32)
            best = iou.max(1) if iou.shape[1] else np.zeros(len(dets))
            hits = best >= hit_iou
            boxes.append(dets.boxes[hits])
            box_labels.append(gt_classes[iou[hits].argmax(1)] if hits.any() else np.zeros(0, np.int64))
            misses = np.nonzero(best < fp_iou)[0][:max_fp_per_image]  # detections come sorted by score
            boxes.append(dets.boxes[misses])
            box_labels.append(np.full(len(misses), background, np.int64))
        all_boxes = np.concatenate(boxes)
        if len(all_boxes):
            c, g = crops_and_geometry(image, all_boxes, config)
            crops.append(c)
            geometry.append(g)
            labels.append(np.concatenate(box_labels))
    return np.concatenate(crops), np.concatenate(geometry), np.concatenate(labels)
