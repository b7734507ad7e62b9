"""Tiled inference for frames larger than the detector's input (line-scan frames of thousands of px).

Overlapping tiles at the detector's input size are detected in batches, their boxes shifted back
to frame pixels, then merged: class-wise NMS removes duplicates seen in two tiles, and a box cut
by a tile's inner edge is fused with the same-class box it overlaps in the neighbouring tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision

from manufacturing.defects.detector import Detections, YoloDetector


@dataclass
class TileConfig:
    tile: int | None = None  # px; None: the detector's input size, so tiles are not rescaled
    overlap: float = 0.25  # fraction of a tile shared with its neighbour; > the largest defect's share
    edge_px: float = 2.0  # a box within this of a tile's inner edge is "cut" and may be fused
    fuse_overlap: float = 0.3  # intersection over the smaller box needed to fuse two cut boxes


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` px sharing about `overlap` of a tile."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _intersection_over_smaller(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(w * h / max(smaller, 1e-9))


def merge_tiles(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, cut: np.ndarray,
                class_scores: np.ndarray | None, *, iou: float, fuse_overlap: float) -> Detections:
    """Merge tile detections in frame pixels. boxes (n, 4), scores (n,), classes (n,), cut (n,) bool."""
    if len(scores) == 0:
        return Detections()
    keep = torchvision.ops.batched_nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(),
                                       torch.from_numpy(classes), iou).numpy()
    boxes, scores, classes, cut = boxes[keep].copy(), scores[keep].copy(), classes[keep], cut[keep].copy()
    class_scores = None if class_scores is None else class_scores[keep].copy()
    alive = np.ones(len(scores), bool)
    merged = True
    while merged:  # a defect spanning three tiles fuses in two rounds
        merged = False
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                if not (alive[i] and alive[j] and classes[i] == classes[j] and (cut[i] or cut[j])):
                    continue
                if _intersection_over_smaller(boxes[i], boxes[j]) < fuse_overlap:
                    continue
                boxes[i] = [min(boxes[i, 0], boxes[j, 0]), min(boxes[i, 1], boxes[j, 1]),
                            max(boxes[i, 2], boxes[j, 2]), max(boxes[i, 3], boxes[j, 3])]
                scores[i] = max(scores[i], scores[j])
                if class_scores is not None:
                    class_scores[i] = np.maximum(class_scores[i], class_scores[j])
                cut[i] = cut[i] and cut[j]
                alive[j] = False
                merged = True
    order = np.argsort(-scores[alive], kind="stable")
    result = Detections(boxes[alive][order].astype(np.float32), scores[alive][order].astype(np.float32),
                        classes[alive][order], None if class_scores is None else class_scores[alive][order])
    return result


def detect_tiled(detector: YoloDetector, frame: np.ndarray, config: TileConfig | None = None, *,
                 conf: float = 0.25, iou: float = 0.7, max_det: int = 1000) -> Detections:
    """Detect on a frame of any size (H, W, 3) uint8 BGR; a frame no larger than a tile is one tile."""
    config = config or TileConfig()
    tile = config.tile or detector.imgsz
    h, w = frame.shape[:2]
    tiles, offsets = [], []
    for y in tile_origins(h, tile, config.overlap):
        for x in tile_origins(w, tile, config.overlap):
            tiles.append(frame[y:y + tile, x:x + tile])
            offsets.append((x, y))
    found = detector.detect(tiles, conf=conf, iou=iou, max_det=max_det)
    boxes, scores, classes, cut, class_scores = [], [], [], [], []
    for (x, y), tile_image, dets in zip(offsets, tiles, found, strict=True):
        th, tw = tile_image.shape[:2]
        b = dets.boxes
        # Cut by an inner edge: touches a tile border that is not also the frame's border.
        near = config.edge_px
        touches = ((b[:, 0] <= near) & (x > 0)) | ((b[:, 1] <= near) & (y > 0)) \
            | ((b[:, 2] >= tw - near) & (x + tw < w)) | ((b[:, 3] >= th - near) & (y + th < h))
        boxes.append(b + np.array([x, y, x, y], np.float32))
        scores.append(dets.scores)
        classes.append(dets.classes)
        cut.append(touches)
        class_scores.append(dets.class_scores)
    return merge_tiles(np.concatenate(boxes), np.concatenate(scores), np.concatenate(classes),
                       np.concatenate(cut), np.concatenate(class_scores), iou=iou,
                       fuse_overlap=config.fuse_overlap)
