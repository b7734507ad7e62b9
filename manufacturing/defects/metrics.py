"""Detection metrics on VOC ground truth: mAP50, mAP50-95, per-class AP, precision and recall.

Matching follows ultralytics' validator (greedy by score, one ground truth per prediction, ten IoU
thresholds 0.50:0.95, multi-label boxes up to 300 per image) and the AP integration is ultralytics'
own `ap_per_class`, so figures are comparable with `yolo val` and with published YOLO numbers.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision

from manufacturing.defects.detector import Detections

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def match_predictions(pred: Detections, gt_boxes: np.ndarray, gt_classes: np.ndarray) -> np.ndarray:
    """(n_pred, 10) bool: prediction i is a true positive at IoU threshold t.

    Greedy in descending score order (COCO, and ultralytics' validator): each prediction claims the
    unclaimed same-class ground truth it overlaps most, if that overlap reaches the threshold.
    """
    correct = np.zeros((len(pred), len(IOU_THRESHOLDS)), bool)
    if len(pred) == 0 or len(gt_boxes) == 0:
        return correct
    iou = torchvision.ops.box_iou(torch.from_numpy(gt_boxes).float(), torch.from_numpy(pred.boxes).float()).numpy()
    iou = iou * (gt_classes[:, None] == pred.classes[None, :])  # (n_gt, n_pred)
    claimed = np.zeros((len(gt_boxes), len(IOU_THRESHOLDS)), bool)
    columns = np.arange(len(IOU_THRESHOLDS))
    for j in np.argsort(-pred.scores, kind="stable"):
        if iou[:, j].max() < IOU_THRESHOLDS[0]:
            continue
        available = np.where(claimed, 0.0, iou[:, j, None])  # (n_gt, thresholds)
        best = available.argmax(0)
        correct[j] = available[best, columns] >= IOU_THRESHOLDS
        claimed[best, columns] |= correct[j]
    return correct


def detection_metrics(predictions: list[Detections], ground_truth: list[tuple[np.ndarray, np.ndarray]],
                      names: list[str]) -> dict:
    """Metrics over a set of images.

    Args:
        predictions: one Detections per image (use a low score threshold, e.g. 0.001, for mAP).
        ground_truth: per image, (boxes (m, 4) xyxy px, classes (m,) int).
        names: class names by index.
    Returns: {"mAP50", "mAP50-95", "precision", "recall", "per_class": {name: {"AP50", "AP50-95",
        "instances"}}, "images", "instances"}.
    """
    from ultralytics.utils.metrics import ap_per_class

    tps, confs, pred_cls, target_cls = [], [], [], []
    for pred, (gt_boxes, gt_classes) in zip(predictions, ground_truth, strict=True):
        tps.append(match_predictions(pred, np.asarray(gt_boxes, np.float32), np.asarray(gt_classes)))
        confs.append(pred.scores)
        pred_cls.append(pred.classes)
        target_cls.append(np.asarray(gt_classes))
    target = np.concatenate(target_cls) if target_cls else np.zeros(0)
    result = {"images": len(predictions), "instances": int(len(target))}
    tp = np.concatenate(tps) if tps else np.zeros((0, 10), bool)
    if len(tp) == 0 or len(target) == 0:
        return {**result, "mAP50": 0.0, "mAP50-95": 0.0, "precision": 0.0, "recall": 0.0,
                "per_class": {n: {"AP50": 0.0, "AP50-95": 0.0, "instances": int((target == i).sum())}
                              for i, n in enumerate(names)}}
    _, _, p, r, _, ap, classes, *_ = ap_per_class(tp, np.concatenate(confs), np.concatenate(pred_cls), target,
                                                  names=dict(enumerate(names)))
    per_class = {n: {"AP50": 0.0, "AP50-95": 0.0, "instances": int((target == i).sum())} for i, n in enumerate(names)}
    for k, c in enumerate(classes.astype(int)):
        per_class[names[c]].update(AP50=float(ap[k, 0]), **{"AP50-95": float(ap[k].mean())})
    return {**result, "mAP50": float(ap[:, 0].mean()), "mAP50-95": float(ap.mean()),
            "precision": float(p.mean()), "recall": float(r.mean()), "per_class": per_class}
