"""A VOC folder of defect images (NEU-DET) as a table for `moeworks data check`: one row per
annotation file.

Rules: the annotation and the image are read as training reads them (`voc.parse_annotation`,
`dataset.load_image` with the declared size); exact copies by SHA-256 of the image bytes, near
copies by perceptual hash (imagehash); a contradiction is the same image bytes under another class.
Domains: clusters of the detector's own embeddings when a detector is given (its Detect head's
input feature maps, average-pooled: what the model sees), else of a small appearance feature
(grey thumbnail and histogram). Level 3 with a detector: cleanlab's object-detection label checks
of the annotated boxes against its predictions; without one, labels are checked by the rules only.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from core.data_quality.images import appearance, file_digest, perceptual_hash
from core.data_quality.table import CheckedTable, DataCheckError
from manufacturing.defects.dataset import load_image
from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.voc import _folders, parse_annotation

MAX_IMAGES = 100_000  # a folder larger than this is not one data check's work
MAX_IMAGE_BYTES = 50 << 20
IMAGE_SEGMENTS = 6  # NEU-DET's six defect kinds; clusters of look, not of class


def detector_pass(detector, paths: list[Path | None], *, batch_size: int = 16,
                  conf: float = 0.01) -> tuple[np.ndarray, list]:
    """One pass of the detector over the images: ((images, channels) the Detect head's input
    feature maps average-pooled per image, the Detections of each image at a low threshold, for
    cleanlab). NaN rows and None where the path is None (an image that failed the rules)."""
    import torch

    if detector.module is None:
        raise DataCheckError(f"{detector.path}: embeddings need the PyTorch detector (detector.pt), not its "
                             "ONNX export")
    head = detector.module.model.model[-1]  # ultralytics' Detect: its input is the feature pyramid
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(
        lambda module, args: captured.append(torch.cat([level.mean(dim=(2, 3)) for level in args[0]], dim=1)))
    readable = [i for i, path in enumerate(paths) if path is not None]
    detections: list = [None] * len(paths)
    try:
        for start in range(0, len(readable), batch_size):
            rows = readable[start:start + batch_size]
            found = detector.detect([load_image(paths[i]) for i in rows], conf=conf, batch_size=batch_size)
            for i, one in zip(rows, found, strict=True):
                detections[i] = one
    finally:
        hook.remove()
    if not captured:
        return np.full((len(paths), 1), np.nan), detections
    pooled = torch.cat(captured).numpy().astype(np.float64)  # (readable, channels)
    embeddings = np.full((len(paths), pooled.shape[1]), np.nan)
    embeddings[readable] = pooled
    return embeddings, detections


def box_label_issues(boxes: list[np.ndarray], classes: list[np.ndarray], detections: list,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose boxes look mislabelled (a wrong class, a missed or misplaced box), by cleanlab's
    object-detection label checks. Returns ((images,) bool issues, (images,) label quality in [0, 1]).

    boxes/classes: each image's annotated (n, 4) xyxy boxes and (n,) class indices; detections:
    the detector's Detections of each image (boxes, scores, classes), low threshold: cleanlab wants
    the unlikely boxes too.
    """
    from cleanlab.object_detection.filter import find_label_issues
    from cleanlab.object_detection.rank import get_label_quality_scores

    labels = [{"bboxes": np.asarray(b, np.float32).reshape(-1, 4), "labels": np.asarray(c, np.int64)}
              for b, c in zip(boxes, classes, strict=True)]
    predictions = []
    for found in detections:
        per_class = np.empty(num_classes, dtype=object)  # cleanlab's format: [k] = (m, 5) x1 y1 x2 y2 score
        found_boxes = np.asarray(found.boxes, np.float32).reshape(-1, 4)
        for k in range(num_classes):
            if found.class_scores is not None:  # every box as a candidate of every class, at that class's score
                per_class[k] = np.column_stack([found_boxes, np.asarray(found.class_scores)[:, k]]).astype(np.float32)
            else:
                keep = np.asarray(found.classes) == k
                per_class[k] = np.column_stack([found_boxes[keep], np.asarray(found.scores, np.float32)[keep]])
            per_class[k] = per_class[k].reshape(-1, 5)
        predictions.append(per_class)
    with contextlib.redirect_stdout(sys.stderr):  # cleanlab prints its pruning note; stdout is --json's
        issues = find_label_issues(labels, predictions)
        quality = get_label_quality_scores(labels, predictions)
    return np.asarray(issues, dtype=bool), np.asarray(quality)


def _box_issues(records, detections, names: list[str], notes: list[str]):
    """(issues, label quality, method) over the images the detector saw whose classes it knows."""
    checked = [i for i, (r, d) in enumerate(zip(records, detections, strict=True))
               if d is not None and all(label in names for label in r.labels)]
    if len(checked) < len(records):
        notes.append(f"level 3: {len(records) - len(checked)} images not box-checked (unreadable, or a class the "
                     "detector does not know)")
    issues, quality = np.zeros(len(records), dtype=bool), np.full(len(records), np.nan)
    if checked:
        found, scores = box_label_issues([records[i].boxes for i in checked],
                                         [np.array([names.index(label) for label in records[i].labels], np.int64)
                                          for i in checked], [detections[i] for i in checked], len(names))
        issues[checked], quality[checked] = found, scores
    return issues, quality, "cleanlab.object_detection.filter.find_label_issues on the detector's boxes"


def load_detector(model: Path):
    """The detector of a `defects train` folder (detector.pt, checked against the folder's manifest)."""
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.workflow import DETECTOR_FILE

    try:
        return YoloDetector.load(model / DETECTOR_FILE if model.is_dir() else model)
    except DefectDataError as error:
        raise DataCheckError(" ".join(str(error).split())) from None


def defects_table(path: str | Path, *, detector=None) -> CheckedTable:
    """detector: a YoloDetector whose embeddings the image domains are found on (None: appearance)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataCheckError(f"{root}: not a folder (give a VOC folder: IMAGES/ + ANNOTATIONS/ or images and XML)")
    image_dir, annotation_dir = _folders(root)
    xml_files = sorted(annotation_dir.glob("*.xml"))[:MAX_IMAGES + 1]
    if not xml_files:
        raise DataCheckError(f"{root}: no VOC annotations (*.xml) in {annotation_dir}")
    if len(xml_files) > MAX_IMAGES:
        raise DataCheckError(f"{root}: more than {MAX_IMAGES} annotations; check the folder in parts")
    records, reasons, digests, hashes, looks = [], [], [], [], []
    for xml in xml_files:
        reason, record, digest, phash, look = "", None, "", np.uint64(0), np.full(24, np.nan)
        try:
            record = parse_annotation(xml, image_dir)
            if record.image_path.stat().st_size > MAX_IMAGE_BYTES:
                raise DefectDataError(f"{record.image_path}: larger than {MAX_IMAGE_BYTES >> 20} MiB")
            load_image(record.image_path, expected_size=(record.width, record.height))
            with Image.open(record.image_path) as image:
                image.load()
                phash, look = perceptual_hash(image), appearance(image)
            digest = file_digest(record.image_path)
        except DefectDataError as error:
            reason = " ".join(str(error).split())
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            reason = f"{xml.stem}: image not readable by PIL ({type(error).__name__})"
        records.append(record)
        reasons.append(reason)
        digests.append(digest)
        hashes.append(phash)
        looks.append(look)
    reasons = np.asarray(reasons, dtype=object)
    classes = sorted({r.labels[0] for r in records if r is not None and r.labels})
    first_class = [r.labels[0] if r is not None and r.labels else "" for r in records]
    labels = np.array([classes.index(c) if c else -1 for c in first_class], dtype=np.int64)
    look_columns = [f"look_{i}" for i in range(24)]
    notes = ["level 3 needs a detector (--model) for cleanlab's box checks; without one, labels are checked by "
             "the rules only"]
    given_issues = None
    if detector is not None:
        vectors, detections = detector_pass(detector, [r.image_path if r is not None and not reason else None
                                                       for r, reason in zip(records, reasons, strict=True)])
        look_columns = [f"embedding_{i}" for i in range(vectors.shape[1])]
        notes[0] = ("level 3 for boxes: cleanlab's object-detection label checks on the detector's predictions; "
                    "on images the detector was trained on they are in-sample and find fewer issues")
        notes.append(f"domains: clusters of the detector's embeddings ({detector.path})")
        given_issues = _box_issues(records, detections, detector.names, notes)
    else:
        vectors = np.vstack(looks)
        notes.append("domains: clusters of a grey thumbnail and histogram (give --model for the detector's embeddings)")
    typed = pd.DataFrame(vectors, columns=look_columns).assign(image_sha256=digests, label=first_class)
    raw = pd.DataFrame({"annotation": [str(x) for x in xml_files],
                        "image": [str(r.image_path) if r is not None else "" for r in records]})
    return CheckedTable(
        dataset="neu_det", source=str(root), raw=raw, typed=typed, fields=[("image_sha256", True)],
        rule_reasons=reasons, labels=labels, segment_fields=look_columns, segments=IMAGE_SEGMENTS,
        label_name="class", perceptual=np.asarray(hashes, dtype=np.uint64), label_check=False,
        given_label_issues=given_issues,
        write=lambda kept, out: _write_voc(root, image_dir, annotation_dir, kept, out),
        notes=notes,
        row_names=np.array([x.stem for x in xml_files], dtype=object))


def _write_voc(root: Path, image_dir: Path, annotation_dir: Path, kept: pd.DataFrame, out: Path) -> Path:
    """The kept images and annotations in the input's layout under out/<folder name>."""
    target = out / root.name
    images = target / image_dir.relative_to(root) if image_dir != root else target
    annotations = target / annotation_dir.relative_to(root) if annotation_dir != root else target
    images.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    for annotation, image in zip(kept["annotation"], kept["image"], strict=True):
        shutil.copyfile(annotation, annotations / Path(annotation).name)
        if image:
            shutil.copyfile(image, images / Path(image).name)
    return target
