"""The defect detector bundle's card, test frames and moeworks' own detections for them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from deploy.bundle.card import min_onnxruntime

FRAMES = 4  # real frames among the test vectors, besides the three flat ones
EDGE_LEVELS = (0, 255, 114)  # black, white and the letterbox grey (nothing to find): the extremes of the input
# The graph's letterbox is OpenCV's fixed-point bilinear bit for bit where it downscales, within one grey level in
# under 1% of the pixels where it upscales (tests/deploy/bundle/test_bundle_defects.py). Frames whose detections
# score this close (relative) to the threshold are not used as test vectors: one grey level could move them across.
THRESHOLD_MARGIN = 0.05
# Detections: scores and boxes of the same frames through onnxruntime and through PyTorch + OpenCV. With the
# float Resize the graph had before, one grey level in ~12% of the pixels moved a trained detector's scores by up to
# 1.3e-2 and one box by 17.5 px on real NEU-DET frames (benchmarks/RESULTS.md, bundles); with OpenCV's rounding
# reproduced the boxes agree to 0.00 px there. The tolerance stays for upscaled frames (smaller than the input).
TOLERANCES = {"boxes": 0.5, "scores": 2e-2, "classes": 0, "sizes_mm": 0.05, "image_index": 0}


def inspector_outputs(inspector, frames_rgb: np.ndarray) -> dict[str, np.ndarray]:
    """`DefectInspector.detect` + its report's size filter on (N, H, W, 3) RGB frames, as the graph's outputs."""
    images = [np.ascontiguousarray(f[:, :, ::-1]) for f in frames_rgb]  # moeworks reads BGR
    out: dict[str, list] = {name: [] for name in ("boxes", "scores", "classes", "sizes_mm", "image_index")}
    for i, dets in enumerate(inspector.detect(images)):
        keep = inspector.calibration.large_enough(dets.boxes)
        out["boxes"].append(dets.boxes[keep].astype(np.float32).reshape(-1, 4))
        out["scores"].append(dets.scores[keep].astype(np.float32))
        out["classes"].append(dets.classes[keep].astype(np.int64))
        out["sizes_mm"].append(inspector.calibration.sizes_mm(dets.boxes[keep]))
        out["image_index"].append(np.full(int(keep.sum()), i, np.int64))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def _frame_files(model_dir: Path, training_data: Path | None) -> list[Path]:
    """Images to draw test frames from: the training folder given, else the validation images of the
    split `defects train` recorded (when its source folder is still there)."""
    from manufacturing.defects.pipeline import list_images

    if training_data is not None:
        return list_images(training_data)
    try:
        split = json.loads((model_dir / "split.json").read_text())
        source = Path(split["source"])
        names = set(split["val"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not source.is_dir():
        return []
    return [p for p in list_images(source) if p.stem in names or p.name in names]


def test_frames(inspector, model_dir: Path, training_data: Path | None) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB: up to FRAMES real frames (cut to a common size no larger than what
    moeworks detects on without tiling), else generated surfaces, then black, white and grey frames."""
    from manufacturing.defects.dataset import load_image

    limit = int(inspector.config.tile_above * inspector.detector.imgsz)
    images = []
    for path in _frame_files(model_dir, training_data)[:64]:
        images.append(load_image(path))
    if not images:
        from manufacturing.defects.synthetic import planted_image

        rng = np.random.default_rng(0)
        grey = [planted_image(rng, min(160, limit), 3)[0] for _ in range(FRAMES * 2)]
        images = [np.repeat(g[:, :, None], 3, axis=2) for g in grey]
    height = min(limit, min(im.shape[0] for im in images))
    width = min(limit, min(im.shape[1] for im in images))
    conf, chosen = inspector.config.conf, []
    for image in images:
        frame = np.ascontiguousarray(image[:height, :width, ::-1])
        lowered = _with_conf(inspector, conf * (1 - THRESHOLD_MARGIN))
        near = inspector_outputs(lowered, frame[None])["scores"]
        if inspector.second_stage is not None:  # the YOLO boxes the stage re-scores cross the same threshold
            near = np.concatenate([near, inspector_outputs(_with_conf(inspector, lowered.config.conf, stage=False),
                                                           frame[None])["scores"]])
        if not ((near > conf * (1 - THRESHOLD_MARGIN)) & (near < conf * (1 + THRESHOLD_MARGIN))).any():
            chosen.append(frame)
        if len(chosen) == FRAMES:
            break
    flat = [np.full((height, width, 3), level, np.uint8) for level in EDGE_LEVELS]
    return np.stack(chosen + flat)


def _with_conf(inspector, conf: float, *, stage: bool = True):
    import dataclasses

    from manufacturing.defects.pipeline import DefectInspector

    return DefectInspector(detector=inspector.detector, calibration=inspector.calibration,
                           second_stage=inspector.second_stage if stage else None,
                           config=dataclasses.replace(inspector.config, conf=conf))


def stage_tolerances(outputs: dict[str, np.ndarray], mm_per_pixel: tuple[float, float]) -> dict[str, float]:
    """TOLERANCES for a bundle with the MoE stage: sizes_mm's area column (mm^2) moves with the box's size,
    so its bound is the one the boxes tolerance implies for the test vectors' largest box,
    |dA| <= dw * h + w * dh + dw * dh with dw, dh up to two box edges' tolerance; widths and heights
    (mm) stay within the boxes tolerance times the scale."""
    tolerances = dict(TOLERANCES)
    boxes = outputs["boxes"].reshape(-1, 4).astype(np.float64)
    if len(boxes):
        w = float((boxes[:, 2] - boxes[:, 0]).max()) * mm_per_pixel[0]
        h = float((boxes[:, 3] - boxes[:, 1]).max()) * mm_per_pixel[1]
        dw, dh = 2 * TOLERANCES["boxes"] * mm_per_pixel[0], 2 * TOLERANCES["boxes"] * mm_per_pixel[1]
        tolerances["sizes_mm"] = max(TOLERANCES["sizes_mm"], float(np.ceil((dw * h + w * dh + dw * dh) * 1e3) / 1e3))
    return tolerances


def stage_parity(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, Any]:
    """The graph's outputs against moeworks' on the test frames: largest differences, as the card states them."""
    same = all(got[n].shape == want[n].shape for n in want) and np.array_equal(got["classes"], want["classes"])
    parity: dict[str, Any] = {"detections": int(len(want["scores"])), "classes_identical": bool(same)}
    if same:
        for name in ("scores", "boxes", "sizes_mm"):
            parity[f"{name}_max_abs_diff"] = float(np.max(np.abs(got[name] - want[name]), initial=0.0))
    return parity


def defects_card(inspector, model_dir: Path, *, opsets: dict[str, int], operators: set[str],
                 data_sha256: str | None, moe_stage_present: bool, stage_file: Path | None = None,
                 parity: dict[str, Any] | None = None, tolerances: dict[str, float] | None = None) -> dict[str, Any]:
    detector, cal, cfg = inspector.detector, inspector.calibration, inspector.config
    weights = model_dir / "detector.pt"
    metadata = _detector_metadata(weights)
    training: dict[str, Any] = {}
    if (model_dir / "split.json").is_file():
        split = json.loads((model_dir / "split.json").read_text())
        training = {"split_sha256": hashlib.sha256((model_dir / "split.json").read_bytes()).hexdigest(),
                    "train_images": len(split.get("train", [])), "val_images": len(split.get("val", [])),
                    "source": split.get("source")}
    if data_sha256:
        training["training_folder_sha256"] = data_sha256
    size = detector.imgsz
    second_stage = ("The model folder holds an MoE second stage (moe_stage.pt); it is NOT in this bundle: "
                    if moe_stage_present else "No MoE second stage. ") + (
        "the crop re-classification cuts and resizes every box with OpenCV and re-scores it with a "
        "second network and a second NMS; the bundle carries the YOLO stage alone, as `moeworks "
        "defects predict` without --moe-stage (bundle build --moe-stage puts it in the graph).")
    if inspector.second_stage is not None:
        stage = inspector.second_stage
        second_stage = (
            f"The MoE second stage ({stage_file.name if stage_file else 'moe_stage.pt'}, sha256 "
            f"{hashlib.sha256(stage_file.read_bytes()).hexdigest()[:16] if stage_file else '?'}) is IN the graph, as "
            "`moeworks defects predict --moe-stage`: each YOLO box is cut with a "
            f"{stage.config.context:g} margin and resized to {stage.config.crop_size} px as cv2.INTER_AREA does "
            "(per-box separable weight matrices, MatMul), re-classified by the crop CNN + MoE layer (sparse "
            f"dispatch: only routed experts run), blended as yolo^{1 - stage.training.blend:g} * "
            f"moe^{stage.training.blend:g} per class, suppressed again class-wise (NMS IoU {cfg.iou}) and kept at "
            f"score >= {cfg.conf}. The crops are OpenCV's to the bit where INTER_AREA interpolates (patches under "
            f"{stage.config.crop_size} px on a side: its fixed-point rounding is reproduced) and off by one grey "
            "level in a few pixels per million where it averages; the letterbox is OpenCV's to the bit where it "
            "downscales (below); measured in runtime.measured_parity on the test frames. Memory grows with boxes x "
            "frame pixels (each crop is computed from its whole frame: K x 3 x H x W floats for K boxes).")
    return {
        "schema": "moeworks-bundle-card/1",
        "model": {"family": "defects/yolo-detector", "dataset": "VOC folder (NEU-DET format)",
                  "version": hashlib.sha256(weights.read_bytes()).hexdigest()[:16], "classes": list(detector.names),
                  "input_size": size, "second_stage": second_stage,
                  "second_stage_in_graph": inspector.second_stage is not None},
        "inputs": [{"name": "image", "type": "tensor(uint8) [N, H, W, 3]", "unit": "grey level 0-255",
                    "meaning": "N camera frames of one size H x W, RGB, rows top to bottom (what an image decoder "
                               "gives; a grey image repeated in the 3 channels). The graph letterboxes each frame to "
                               f"{size} x {size} (scale to fit, grey 114 borders) as moeworks does.",
                    "allowed_range": {"min": 0, "max": 255, "frame_longest_side_px": int(cfg.tile_above * size)},
                    "missing": "no missing values: every pixel is a grey level",
                    "protected_attribute": ""}],
        "outputs": [
            {"name": "boxes", "type": "tensor(float) [K, 4]",
             "meaning": "x1, y1, x2, y2 of each detection in frame pixels (K detections of the whole batch, frame by "
                        "frame, strongest first)"},
            {"name": "scores", "type": "tensor(float) [K]", "meaning": "detection confidence in [0, 1]"},
            {"name": "classes", "type": "tensor(int64) [K]", "labels": list(detector.names),
             "meaning": "index into labels"},
            {"name": "sizes_mm", "type": "tensor(double) [K, 3]",
             "meaning": "width mm, height mm, box area mm^2 (frame pixels times the calibration)"},
            {"name": "image_index", "type": "tensor(int64) [K]", "meaning": "the frame of the batch (0-based)"}],
        "postprocessing": {"conf": cfg.conf, "nms_iou": cfg.iou, "max_det_per_frame": cfg.max_det,
                           "nms": "class-wise (ONNX NonMaxSuppression), one class per box (its best)",
                           "calibration": cal.to_dict(),
                           "size_filter": f"detections whose longer side is under {cal.min_size_mm} mm are dropped"},
        "training_data": training,
        "validation_metrics": metadata.get("metrics", {}),
        "protected_attributes": {"raw_fields": {}, "note": "images of steel surfaces; no personal data"},
        "intended_use": "Finding and measuring surface defects on frames of the same line, camera and lighting as "
                        "the training images, as a decision aid for inspection.",
        "limitations": [
            "Trained on one dataset's images; re-validate (mAP) on the plant's own annotated frames first.",
            f"Frames longer than {int(cfg.tile_above * size)} px are tiled by moeworks (overlapping "
            f"tiles of {size} px, NMS over the frame); the graph letterboxes the whole frame instead. Cut larger "
            "frames into tiles of at most that size before scoring, or score them with moeworks.",
            "Sizes in mm hold only for the calibration above (camera distance, lens, line speed); re-calibrate when "
            "they change and rebuild the bundle with --calibration.",
            "The letterbox reproduces OpenCV's fixed-point bilinear (uint8 INTER_LINEAR) bit for bit where it "
            "downscales; a frame smaller than the input is upscaled with one grey level off in under 1% of its "
            "pixels, which can move scores and boxes by up to the tolerances below.",
            second_stage.strip()],
        "runtime": {"onnx_opsets": opsets, "min_onnxruntime": min_onnxruntime(operators),
                    "tolerances": dict(tolerances or TOLERANCES),
                    **({"measured_parity": parity} if parity is not None else {})},
    }


def _detector_metadata(path: Path) -> dict:
    """The detector file's metadata (metrics), read weights-only."""
    from core.trainer import read_checkpoint

    return read_checkpoint(path).get("metadata", {})
