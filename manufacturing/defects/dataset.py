"""Images and labels in ultralytics' layout: `images/{train,val}`, `labels/{train,val}`, `data.yaml`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml

from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.voc import VOCImage


def load_image(path: str | Path, *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image as (height, width, 3) uint8 BGR; grayscale images are expanded to 3 channels.

    Raises DefectDataError for a missing or corrupt file, or one whose size differs from
    `expected_size` (width, height), the size its annotation declares.
    """
    path = Path(path)
    if not path.is_file():
        raise DefectDataError(f"{path}: no such image file")
    data = np.fromfile(path, np.uint8)
    if data.size == 0:  # OpenCV asserts (a traceback) on an empty buffer rather than returning None
        raise DefectDataError(f"{path}: empty image file (0 bytes)")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        raise DefectDataError(f"{path}: corrupt or unsupported image file (could not decode)")
    if expected_size is not None and (image.shape[1], image.shape[0]) != tuple(expected_size):
        raise DefectDataError(f"{path}: field <size> says {expected_size[0]}x{expected_size[1]} but the image "
                              f"is {image.shape[1]}x{image.shape[0]}")
    return image


def voc_to_yolo(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(n, 4) xyxy pixels -> (n, 4) normalised (cx, cy, w, h), as in ultralytics label files."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], np.float64)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = boxes[:, 2:] - boxes[:, :2]
    return np.concatenate([centre, size], axis=1) / scale


def yolo_to_voc(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Inverse of voc_to_yolo: (n, 4) normalised (cx, cy, w, h) -> (n, 4) xyxy pixels."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * np.array([width, height, width, height])
    half = boxes[:, 2:] / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def _place(source: Path, target: Path) -> None:
    """Link the image where the filesystem allows (no copy of a large set), else copy it."""
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.symlink(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


def write_yolo_dataset(splits: dict[str, list[VOCImage]], out_dir: str | Path, names: list[str], *,
                       check_images: bool = True) -> Path:
    """Write an ultralytics detection dataset for `splits` ({"train": [...], "val": [...]}).

    Every image is decoded once first (when `check_images`), so a corrupt file or one of the wrong
    size stops here with its name rather than inside a training run. Returns the data.yaml path.
    """
    out_dir = Path(out_dir).resolve()
    index = {name: i for i, name in enumerate(names)}
    for split, records in splits.items():
        if not records:
            raise DefectDataError(f"split {split!r} has no images")
        image_dir, label_dir = out_dir / "images" / split, out_dir / "labels" / split
        for folder in (image_dir, label_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        for record in records:
            if check_images:
                load_image(record.image_path, expected_size=(record.width, record.height))
            unknown = [label for label in record.labels if label not in index]
            if unknown:
                raise DefectDataError(f"{record.image_path}: field <name> {unknown[0]!r} is not one of the "
                                      f"model's classes {names}")
            _place(record.image_path, image_dir / record.image_path.name)
            rows = voc_to_yolo(record.boxes, record.width, record.height)
            lines = [f"{index[label]} " + " ".join(f"{v:.6f}" for v in row)
                     for label, row in zip(record.labels, rows, strict=True)]
            (label_dir / f"{record.image_path.stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data = {"path": str(out_dir), **{split: f"images/{split}" for split in splits},
            "names": dict(enumerate(names))}
    data_yaml = out_dir / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml
