"""Millimetres per pixel for a camera, and physical sizes of detections."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from manufacturing.defects.errors import DefectDataError


@dataclass
class Calibration:
    """A camera's scale on the inspected surface (a line-scan camera can differ along and across)."""

    mm_per_pixel_x: float = 0.1  # a 2 k-pixel line camera over a 200 mm strip
    mm_per_pixel_y: float = 0.1
    min_size_mm: float = 0.2  # the seed's smallest defect worth reporting (the longer side)

    def __post_init__(self) -> None:
        for name in ("mm_per_pixel_x", "mm_per_pixel_y"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and np.isfinite(value)):
                raise DefectDataError(f"calibration field {name!r} must be a positive number, got {value!r}")
        if not self.min_size_mm >= 0:
            raise DefectDataError(f"calibration field 'min_size_mm' must be >= 0, got {self.min_size_mm!r}")

    @classmethod
    def from_file(cls, path: str | Path) -> Calibration:
        """Read a JSON or YAML file with mm_per_pixel_x, mm_per_pixel_y (or mm_per_pixel) and min_size_mm."""
        path = Path(path)
        try:
            text = path.read_text()
            values = json.loads(text) if path.suffix == ".json" else __import__("yaml").safe_load(text)
        except (OSError, ValueError) as error:
            raise DefectDataError(f"{path}: unreadable calibration file ({error})") from None
        if not isinstance(values, dict):
            raise DefectDataError(f"{path}: a calibration file holds a mapping of fields")
        if "mm_per_pixel" in values:
            scale = values.pop("mm_per_pixel")
            values.setdefault("mm_per_pixel_x", scale)
            values.setdefault("mm_per_pixel_y", scale)
        unknown = sorted(set(values) - {"mm_per_pixel_x", "mm_per_pixel_y", "min_size_mm"})
        if unknown:
            raise DefectDataError(f"{path}: unknown calibration field(s) {unknown}")
        return cls(**values)

    @classmethod
    def from_reference(cls, image: np.ndarray, *, width_mm: float, height_mm: float,
                       box: tuple[float, float, float, float] | None = None, min_size_mm: float = 0.2) -> Calibration:
        """Scale from a rectangular reference object of known size in an image.

        `box` (xyxy px) gives the object's extent; without it the object is found as the largest
        blob that contrasts with the background (Otsu threshold), measured by its minimum-area
        rectangle so a slightly rotated target still measures right. The longer side is matched to
        the longer of width_mm / height_mm.
        """
        if box is not None:
            x1, y1, x2, y2 = box
            sides_px = np.array([x2 - x1, y2 - y1], np.float64)
            sides_mm = np.array([width_mm, height_mm], np.float64)
        else:
            grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
            grey = cv2.GaussianBlur(grey, (5, 5), 0)
            _, mask = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            if mask.mean() > 127:  # the object is the minority phase
                mask = 255 - mask
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            if not contours:
                raise DefectDataError("calibration reference: no object found in the image")
            contour = max(contours, key=cv2.contourArea)
            (_, _), (w, h), _ = cv2.minAreaRect(contour)
            if min(w, h) < 4:
                raise DefectDataError("calibration reference: the object found is under 4 px across")
            _, _, box_w, box_h = cv2.boundingRect(contour)
            if box_w * box_h <= 1.1 * (w + 1) * (h + 1):  # axis-aligned: x stays x, y stays y
                sides_px = np.array([box_w, box_h], np.float64)
                sides_mm = np.array([width_mm, height_mm], np.float64)
            else:  # rotated: minAreaRect's sides are unordered, so pair long with long
                sides_px = np.sort([w + 1, h + 1])
                sides_mm = np.sort([width_mm, height_mm])
        scale = sides_mm / sides_px
        return cls(float(scale[0]), float(scale[1]), min_size_mm)

    def sizes_mm(self, boxes: np.ndarray) -> np.ndarray:
        """(n, 4) xyxy px -> (n, 3): width mm, height mm, box area mm^2."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        width = (boxes[:, 2] - boxes[:, 0]) * self.mm_per_pixel_x
        height = (boxes[:, 3] - boxes[:, 1]) * self.mm_per_pixel_y
        return np.stack([width, height, width * height], axis=1)

    def large_enough(self, boxes: np.ndarray) -> np.ndarray:
        """(n,) bool: the longer side reaches min_size_mm."""
        sizes = self.sizes_mm(boxes)
        return np.maximum(sizes[:, 0], sizes[:, 1]) >= self.min_size_mm

    def to_dict(self) -> dict[str, float]:
        return asdict(self)
