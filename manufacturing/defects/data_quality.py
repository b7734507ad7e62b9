"""A VOC folder of defect images (NEU-DET) as a table for `moeworks data check`: one row per
annotation file.

Rules: the annotation and the image are read as training reads them (`voc.parse_annotation`,
`dataset.load_image` with the declared size); exact copies by SHA-256 of the image bytes, near
copies by perceptual hash (imagehash); a contradiction is the same image bytes under another class.
Domains: clusters of the detector's own embeddings when a detector is given (its Detect head's
input feature maps, average-pooled: what the model sees), else of a small appearance feature
(grey thumbnail and histogram). Level 3 (cleanlab's object-detection label checks) is not done
for boxes: the report says so.
"""

from __future__ import annotations

import shutil
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


def detector_embeddings(detector, paths: list[Path | None], *, batch_size: int = 16) -> np.ndarray:
    """(images, channels) the Detect head's input feature maps average-pooled per image (NaN rows
    where the path is None: an image that failed the rules)."""
    import torch

    from manufacturing.defects.detector import to_input

    if detector.module is None:
        raise DataCheckError(f"{detector.path}: embeddings need the PyTorch detector (detector.pt), not its "
                             "ONNX export")
    head = detector.module.model.model[-1]  # ultralytics' Detect: its input is the feature pyramid
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(
        lambda module, args: captured.append(torch.cat([level.mean(dim=(2, 3)) for level in args[0]], dim=1)))
    readable = [i for i, path in enumerate(paths) if path is not None]
    try:
        for start in range(0, len(readable), batch_size):
            chunk = [load_image(paths[i]) for i in readable[start:start + batch_size]]
            detector.raw(to_input(chunk, detector.imgsz)[0])
    finally:
        hook.remove()
    if not captured:
        return np.full((len(paths), 1), np.nan)
    found = torch.cat(captured).numpy().astype(np.float64)  # (readable, channels)
    embeddings = np.full((len(paths), found.shape[1]), np.nan)
    embeddings[readable] = found
    return embeddings


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
    notes = ["level 3 for defect boxes (cleanlab object detection) is not done; labels are checked by rules only"]
    if detector is not None:
        vectors = detector_embeddings(detector, [r.image_path if r is not None and not reason else None
                                                 for r, reason in zip(records, reasons, strict=True)])
        look_columns = [f"embedding_{i}" for i in range(vectors.shape[1])]
        notes.append(f"domains: clusters of the detector's embeddings ({detector.path})")
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
