"""Calibrated box confidence for the annotation loop: a detector's score mapped to the probability
that the box is right, so that the auto-accept threshold (0.9) means what it says.

YOLO's scores are not probabilities of being right: a detector trained briefly or on few images
rarely scores a box 0.9 although many of its 0.6 boxes are right, and a long-trained one can score
wrong boxes high. The map is fitted on labelled images the detector was NOT trained on (a
calibration part a person labelled): each box the detector reports (score >= floor) is right when
it claims an unclaimed true box of the same class at IoU >= 0.5 (the validator's greedy matching,
`metrics.match_predictions`), and scikit-learn's isotonic regression of right-or-wrong on the score
gives a non-decreasing map (Zadrozny & Elkan's calibration; fewer assumptions than Platt or
temperature scaling, whose single parameter cannot bend a detector's S-shaped reliability curve).
Isotonic regression predicts by linear interpolation between its thresholds, clipped at the ends;
`__call__` does the same with `np.interp`, so a stored map needs no pickle, only its points.

A map belongs to one detector file (its SHA-256 is stored and checked) and is saved in the pool as
a content-addressed object that the version it produced names in its origin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from manufacturing.defects.errors import DefectDataError

SCHEMA = "moeworks.defects.score-calibration/1"
MIN_BOXES = 30  # fewer reported boxes than this cannot say where 90% precision lies
MAX_POINTS = 10_000  # a stored map's thresholds (isotonic keeps at most one per distinct score)


@dataclass(frozen=True, kw_only=True)
class ScoreCalibration:
    """model: SHA-256 of the detector file; x, y: the isotonic map's thresholds (raw score, ascending)
    and values (probability right); images, boxes, right: what it was fitted on; floor: raw score
    from which a box was counted."""

    model: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    images: int
    boxes: int
    right: int
    floor: float

    def __post_init__(self) -> None:
        x, y = np.asarray(self.x, np.float64), np.asarray(self.y, np.float64)
        if not (1 <= len(x) == len(y) <= MAX_POINTS):
            raise ValueError(f"a score calibration needs 1 to {MAX_POINTS} points with x and y of equal length")
        if not (np.isfinite(x).all() and np.isfinite(y).all() and (np.diff(x) >= 0).all() and (np.diff(y) >= 0).all()
                and ((y >= 0) & (y <= 1)).all()):
            raise ValueError("a score calibration's x and y must be finite and non-decreasing, y in [0, 1]")
        if not 0 <= self.floor < 1:
            raise ValueError(f"floor must be in [0, 1), got {self.floor}")

    def __call__(self, scores) -> np.ndarray:
        """(n,) raw scores -> (n,) calibrated, as IsotonicRegression(out_of_bounds='clip').predict."""
        return np.interp(np.asarray(scores, np.float64), self.x, self.y).astype(np.float32)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "method": "isotonic", **asdict(self), "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_json(cls, document) -> ScoreCalibration:
        """A stored map, checked (a foreign or broken document is refused with DefectDataError)."""
        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            raise DefectDataError(f"not a score calibration (schema {SCHEMA})")
        try:
            return cls(model=str(document["model"]), x=tuple(float(v) for v in document["x"]),
                       y=tuple(float(v) for v in document["y"]), images=int(document["images"]),
                       boxes=int(document["boxes"]), right=int(document["right"]), floor=float(document["floor"]))
        except (KeyError, TypeError, ValueError) as error:
            raise DefectDataError(f"broken score calibration: {error}") from None


def box_outcomes(detections: list, records: list, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, right) of every reported box against the records' true boxes (IoU >= 0.5, same class,
    greedy by score); detections and records in the same order."""
    from manufacturing.defects.metrics import match_predictions

    index = {name: i for i, name in enumerate(names)}
    scores, right = [], []
    for found, record in zip(detections, records, strict=True):
        unknown = sorted(set(record.labels) - set(index))
        if unknown:
            raise DefectDataError(f"{record.image_path}: classes {unknown} the detector does not know")
        truth = np.asarray([index[label] for label in record.labels], np.int64)
        correct = match_predictions(found, np.asarray(record.boxes, np.float32).reshape(-1, 4), truth)[:, 0]
        scores.append(np.asarray(found.scores, np.float64))
        right.append(correct)
    return np.concatenate(scores or [np.zeros(0)]), np.concatenate(right or [np.zeros(0, bool)])


def fit_score_calibration(detections: list, records: list, *, names: list[str], model: str,
                          floor: float) -> ScoreCalibration:
    """The isotonic map of the detector's boxes (score >= floor) on labelled records it was not trained on."""
    from sklearn.isotonic import IsotonicRegression

    kept = [found.select(np.asarray(found.scores) >= floor) for found in detections]
    scores, right = box_outcomes(kept, records, names)
    if len(scores) < MIN_BOXES:
        raise DefectDataError(f"the detector reported {len(scores)} boxes (score >= {floor}) on the {len(records)} "
                              f"calibration images; at least {MIN_BOXES} are needed: label more images")
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(scores, right)
    return ScoreCalibration(model=model, x=tuple(map(float, fitted.X_thresholds_)),
                            y=tuple(map(float, fitted.y_thresholds_)), images=len(records),
                            boxes=int(len(scores)), right=int(right.sum()), floor=float(floor))
