"""Millimetre calibration, and tiled inference that merges boxes across tile borders."""

import json

import cv2
import numpy as np
import pytest

from manufacturing.defects.calibration import Calibration
from manufacturing.defects.detector import Detections
from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.tiling import TileConfig, detect_tiled, merge_tiles, tile_origins


def test_sizes_in_mm_and_minimum_size():
    cal = Calibration(mm_per_pixel_x=0.1, mm_per_pixel_y=0.05, min_size_mm=0.2)
    sizes = cal.sizes_mm(np.array([[10, 10, 30, 50], [0, 0, 1, 3]]))
    np.testing.assert_allclose(sizes, [[2.0, 2.0, 4.0], [0.1, 0.15, 0.015]])
    assert cal.large_enough(np.array([[10, 10, 30, 50], [0, 0, 1, 3], [0, 0, 2, 1]])).tolist() == [True, False, True]


def test_calibration_from_file_and_bad_field(tmp_path):
    (tmp_path / "cam.json").write_text(json.dumps({"mm_per_pixel": 0.08, "min_size_mm": 0.5}))
    assert Calibration.from_file(tmp_path / "cam.json") == Calibration(0.08, 0.08, 0.5)
    (tmp_path / "bad.yaml").write_text("mm_per_pixel_x: -1\n")
    with pytest.raises(DefectDataError, match="mm_per_pixel_x"):
        Calibration.from_file(tmp_path / "bad.yaml")


@pytest.mark.parametrize("angle", [0.0, 20.0])
def test_calibration_from_a_reference_object(angle):
    # A 40 x 20 mm plate imaged at 0.25 mm/px: 160 x 80 px, drawn upright and rotated.
    image = np.full((300, 400, 3), 60, np.uint8)
    corners = cv2.boxPoints(((200, 150), (160, 80), angle)).astype(np.int32)
    cv2.fillPoly(image, [corners], (220, 220, 220))
    cal = Calibration.from_reference(image, width_mm=40, height_mm=20)
    assert cal.mm_per_pixel_x == pytest.approx(0.25, rel=0.03)
    assert cal.mm_per_pixel_y == pytest.approx(0.25, rel=0.03)
    boxed = Calibration.from_reference(image, width_mm=40, height_mm=20, box=(120, 110, 280, 190))
    assert (boxed.mm_per_pixel_x, boxed.mm_per_pixel_y) == (0.25, 0.25)


def test_tile_origins_cover_the_frame_with_overlap():
    starts = tile_origins(1000, 192, 0.25)
    assert starts[0] == 0 and starts[-1] + 192 == 1000
    assert all(b - a <= 144 for a, b in zip(starts, starts[1:], strict=False))
    assert tile_origins(150, 192, 0.25) == [0]


def test_merge_fuses_a_box_cut_by_a_tile_border_and_keeps_separate_ones():
    boxes = np.array([[150, 40, 192, 60],   # left part of a scratch, cut by tile 1's right edge
                      [144, 40, 250, 61],   # right part, cut by tile 2's left edge
                      [300, 10, 320, 30],   # an unrelated defect
                      [150, 100, 192, 120]], np.float32)  # cut, but a different class
    merged = merge_tiles(boxes, np.array([0.9, 0.8, 0.7, 0.6], np.float32), np.array([0, 0, 0, 1]),
                         np.array([True, True, False, True]), None, iou=0.7, fuse_overlap=0.3)
    assert len(merged) == 3
    np.testing.assert_allclose(merged.boxes[0], [144, 40, 250, 61])
    assert merged.scores[0] == pytest.approx(0.9)


class DarkBlobDetector:
    """A classical detector (Otsu-free fixed threshold + connected components) with YoloDetector's
    `imgsz` / `detect` interface: it finds the near-black defects planted below, which makes the
    tiling and merging logic checkable against exact positions without a trained network."""

    imgsz = 192
    names = ["dark"]

    def detect(self, images, *, conf, iou, max_det):
        out = []
        for image in images:
            mask = (image.min(axis=2) < 8).astype(np.uint8)
            count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, area in stats[1:] if area >= 6], np.float32)
            boxes = boxes.reshape(-1, 4)
            out.append(Detections(boxes, np.full(len(boxes), 0.9, np.float32), np.zeros(len(boxes), np.int64),
                                  np.full((len(boxes), 1), 0.9, np.float32)))
        return out


def test_tiled_detection_on_a_large_frame_of_neu_images_finds_defects_in_place(data_root):
    from manufacturing.defects.dataset import load_image

    folder = data_root / "neu_det" / "IMAGES"
    names = ["crazing_1", "inclusion_10", "patches_10", "pitted_surface_10", "rolled-in_scale_10", "scratches_10",
             "crazing_10", "inclusion_100"]
    tiles = [load_image(folder / f"{n}.jpg") for n in names if (folder / f"{n}.jpg").exists()][:8]
    assert len(tiles) >= 6
    tiles = (tiles * 2)[:8]
    frame = np.vstack([np.hstack(tiles[:4]), np.hstack(tiles[4:])])  # 800 x 400 px, a line-scan strip
    frame = np.maximum(frame, 12)  # lift NEU's darkest pixels so only planted defects are near-black
    planted = [(30, 30, 60, 50),          # inside one tile
               (120, 150, 260, 158),      # a scratch across tile seams and across two NEU images
               (500, 180, 520, 330),      # a vertical one across the middle row seam
               (700, 350, 760, 390)]      # at the frame corner
    for x1, y1, x2, y2 in planted:
        frame[y1:y2, x1:x2] = 0
    found = detect_tiled(DarkBlobDetector(), frame, TileConfig(overlap=0.25), conf=0.25, iou=0.7)
    assert len(found) == len(planted), found.boxes
    for box in planted:
        best = max(_iou(box, b) for b in found.boxes)
        assert best > 0.95, (box, found.boxes)


def _iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_detection_metrics_reference_cases():
    from manufacturing.defects.metrics import detection_metrics

    gt_boxes = np.array([[10, 10, 50, 50], [60, 60, 90, 120]], np.float32)
    gt = [(gt_boxes, np.array([0, 1]))]
    perfect = Detections(gt_boxes, np.array([0.9, 0.8], np.float32), np.array([0, 1]))
    m = detection_metrics([perfect], gt, ["a", "b"])
    assert m["mAP50"] == pytest.approx(1.0, abs=0.01) and m["mAP50-95"] == pytest.approx(1.0, abs=0.01)
    swapped = Detections(gt_boxes, np.array([0.9, 0.8], np.float32), np.array([1, 0]))
    assert detection_metrics([swapped], gt, ["a", "b"])["mAP50"] == 0.0
    # Shifted by a quarter of the box: IoU 0.6, a hit at 0.5 but not at 0.75 and above.
    shifted = Detections(gt_boxes[:1] + np.array([10, 0, 10, 0], np.float32), np.array([0.9], np.float32),
                         np.array([0]))
    m = detection_metrics([shifted], [(gt_boxes[:1], np.array([0]))], ["a"])
    assert m["mAP50"] == pytest.approx(1.0, abs=0.01) and 0.1 < m["mAP50-95"] < 0.5


def test_matching_is_greedy_by_score_so_a_weak_duplicate_cannot_steal_a_hit():
    from manufacturing.defects.metrics import match_predictions

    gt = np.array([[10, 10, 50, 50]], np.float32)
    # The confident box overlaps the defect by IoU 0.8, a weak duplicate by 1.0.
    pred = Detections(np.array([[10, 10, 50, 60], [10, 10, 50, 50]], np.float32), np.array([0.9, 0.1], np.float32),
                      np.array([0, 0]))
    correct = match_predictions(pred, gt, np.array([0]))
    assert correct[0, 0] and not correct[1, 0]  # at IoU 0.5 the confident box is the hit
    assert not correct[0, -1] and correct[1, -1]  # at 0.95 only the exact one qualifies


def test_multi_label_postprocess_proposes_every_class_above_threshold():
    from manufacturing.defects.detector import postprocess

    raw = np.zeros((1, 4 + 3, 2), np.float32)
    raw[0, :4, 0] = [50, 50, 20, 20]  # cx, cy, w, h
    raw[0, 4:, 0] = [0.6, 0.3, 0.001]
    raw[0, :4, 1] = [10, 10, 4, 4]
    raw[0, 4:, 1] = [0.0, 0.0, 0.2]
    frames, shapes = [(1.0, (0, 0))], [(100, 100)]
    single = postprocess(raw, frames, shapes, conf=0.1, iou=0.7, max_det=10)[0]
    multi = postprocess(raw, frames, shapes, conf=0.1, iou=0.7, max_det=10, multi_label=True)[0]
    assert sorted(single.classes.tolist()) == [0, 2]
    order = np.argsort(multi.classes)
    assert multi.classes[order].tolist() == [0, 1, 2]
    np.testing.assert_allclose(multi.scores[order], [0.6, 0.3, 0.2], rtol=1e-6)
    np.testing.assert_allclose(multi.boxes[0], [40, 40, 60, 60])
