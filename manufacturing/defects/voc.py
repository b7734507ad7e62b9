"""Pascal VOC folders: images plus one XML of boxes per image, read into plain records.

Accepted layouts: `IMAGES/` + `ANNOTATIONS/` (NEU-DET), `JPEGImages/` + `Annotations/` (VOC), or
images and XML files side by side in one folder. Every problem is a DefectDataError that names
the file and the field, so a bad annotation never surfaces as a traceback.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from manufacturing.defects.errors import DefectDataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_LAYOUTS = (("IMAGES", "ANNOTATIONS"), ("JPEGImages", "Annotations"), ("images", "annotations"))


@dataclass
class VOCImage:
    """One annotated image. `boxes` is (n, 4) float32 xyxy in pixels; `labels` has n class names."""

    image_path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.image_path.stem


def _folders(root: Path) -> tuple[Path, Path]:
    for image_name, annotation_name in _LAYOUTS:
        if (root / image_name).is_dir() and (root / annotation_name).is_dir():
            return root / image_name, root / annotation_name
    return root, root


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = node.findtext(tag)
    if text is None:
        raise DefectDataError(f"{where}: missing field <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise DefectDataError(f"{where}: field <{tag}> is not a number: {text!r}") from None


def parse_annotation(xml_path: Path, image_dir: Path) -> VOCImage:
    """Read one VOC XML; the image is `<filename>` in `image_dir`, else the XML's stem with an image suffix."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        raise DefectDataError(f"{xml_path}: not valid XML ({error})") from None
    size = root.find("size")
    if size is None:
        raise DefectDataError(f"{xml_path}: missing field <size>")
    width, height = (int(_number(size, tag, f"{xml_path} <size>")) for tag in ("width", "height"))
    if width <= 0 or height <= 0:
        raise DefectDataError(f"{xml_path}: field <size> must be positive, got {width}x{height}")
    image_path = image_dir / (root.findtext("filename") or "")
    if not image_path.is_file():
        candidates = [image_dir / f"{xml_path.stem}{s}" for s in IMAGE_SUFFIXES]
        image_path = next((c for c in candidates if c.is_file()), None)
        if image_path is None:
            raise DefectDataError(f"{xml_path}: field <filename>: no image {root.findtext('filename')!r} "
                                  f"or {xml_path.stem}.* in {image_dir}")
    boxes, labels = [], []
    for row, obj in enumerate(root.iter("object")):
        where = f"{xml_path} object {row}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DefectDataError(f"{where}: missing field <name>")
        box = obj.find("bndbox")
        if box is None:
            raise DefectDataError(f"{where}: missing field <bndbox>")
        x1, y1, x2, y2 = (_number(box, tag, f"{where} <bndbox>") for tag in ("xmin", "ymin", "xmax", "ymax"))
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise DefectDataError(f"{where}: field <bndbox> ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty or "
                                  f"outside the {width}x{height} image")
        boxes.append((x1, y1, x2, y2))
        labels.append(name)
    return VOCImage(image_path, width, height, np.asarray(boxes, np.float32).reshape(-1, 4), labels)


def read_voc_folder(root: str | Path) -> list[VOCImage]:
    """All annotated images of a VOC folder, sorted by annotation file name."""
    root = Path(root)
    if not root.is_dir():
        raise DefectDataError(f"{root}: no such folder")
    image_dir, annotation_dir = _folders(root)
    xml_files = sorted(annotation_dir.glob("*.xml"))
    if not xml_files:
        raise DefectDataError(f"{root}: empty folder: no VOC annotations (*.xml) in {annotation_dir}")
    return [parse_annotation(path, image_dir) for path in xml_files]


def class_names(records: list[VOCImage]) -> list[str]:
    """Sorted class names found in the records (the class index order of every model built on them)."""
    return sorted({label for record in records for label in record.labels})


def seeded_split(records: list[VOCImage], *, val_fraction: float = 0.2,
                 seed: int = 0) -> tuple[list[VOCImage], list[VOCImage]]:
    """A split stratified by each image's first class (NEU-DET holds one class per image).

    Deterministic for a given seed and set of file names, whatever the order they were listed in.
    """
    assert 0 < val_fraction < 1, f"val_fraction must be in (0, 1), got {val_fraction}"
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[VOCImage]] = {}
    for record in sorted(records, key=lambda r: r.name):
        by_class.setdefault(record.labels[0] if record.labels else "", []).append(record)
    train, val = [], []
    for key in sorted(by_class):
        group = by_class[key]
        order = rng.permutation(len(group))
        n_val = max(1, round(val_fraction * len(group))) if len(group) > 1 else 0
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def data_sha256(records: list[VOCImage]) -> str:
    """SHA-256 of a VOC folder's content: each image's name, boxes, labels and image bytes, in name order.

    Recorded in a run's split.json so that `defects train --resume` can tell the same data from a
    folder of the same name whose images or annotations changed.
    """
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.name):
        digest.update(json.dumps([record.name, record.width, record.height, list(record.labels),
                                  np.round(np.asarray(record.boxes, np.float64), 3).tolist()]).encode())
        digest.update(hashlib.sha256(Path(record.image_path).read_bytes()).digest())
    return digest.hexdigest()


def write_split(path: str | Path, train: list[VOCImage], val: list[VOCImage], *, seed: int,
                val_fraction: float, source: str, data_hash: str | None = None) -> Path:
    """Record a split (file names only, and the data's SHA-256) so that it can be reproduced and cited."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hashed = {} if data_hash is None else {"data_sha256": data_hash}
    path.write_text(json.dumps({"source": source, "seed": seed, "val_fraction": val_fraction, **hashed,
                                "method": "stratified by first class, numpy default_rng permutation",
                                "train": sorted(r.name for r in train), "val": sorted(r.name for r in val)},
                               indent=1) + "\n")
    return path
