"""Level 1, rules: duplicates, near duplicates, contradictions, leakage and ranges of tabular rows.

Rows are compared by the 64-bit hash of their input fields (core.row_fingerprint.row_hashes, the
hash the models' fingerprints hold), so "the same row" means the same thing here and when a model
reports the share of rows it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.row_fingerprint import RowFingerprint, row_hashes


@dataclass(frozen=True)
class RuleConfig:
    # near duplicates: equal once every number is binned to this share of its field's robust
    # standard deviation (1%: two applicants whose incomes differ by a few currency units)
    near_tolerance: float = 0.01
    range_margin: float = 0.1  # a value this share of the training span beyond the training range is out of range

    def __post_init__(self) -> None:
        if not 0 < self.near_tolerance <= 1:
            raise ValueError(f"near_tolerance must be in (0, 1], got {self.near_tolerance}")
        if self.range_margin < 0:
            raise ValueError(f"range_margin must be >= 0, got {self.range_margin}")


def robust_spread(values: np.ndarray) -> float:
    """Interquartile range / 1.349 (the standard deviation for normal data, unmoved by a debt ratio
    of 300,000), the standard deviation where most values are equal, 0 for a constant field."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return 0.0
    q75, q25 = np.percentile(values, [75, 25])
    return float((q75 - q25) / 1.349) if q75 > q25 else float(values.std())


def binned(values: np.ndarray, width: float) -> np.ndarray:
    """Values as the index of their bin of `width` (NaN kept; a width of 0 keeps the values)."""
    values = np.asarray(values, dtype=np.float64)
    return np.floor(values / width) if width > 0 else values


def repeated(hashes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(later copies, group id) among rows in `mask`: a row is a copy when an earlier masked row has its hash.

    group: (rows,) int, the position of the first row with the same hash (-1 outside the mask).
    """
    rows = np.flatnonzero(mask)
    first_of = pd.Series(rows).groupby(hashes[rows]).transform("min").to_numpy()
    group = np.full(len(hashes), -1, dtype=np.int64)
    group[rows] = first_of
    copies = np.zeros(len(hashes), dtype=bool)
    copies[rows] = first_of != rows
    return copies, group


def exact_duplicates(typed: pd.DataFrame, fields: list[tuple[str, bool]], good: np.ndarray,
                     labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes, duplicate rows, contradicting rows).

    A duplicate repeats an earlier row's inputs and label; a contradiction is every row of a group
    of equal inputs carrying more than one label (which label is right is not known, so all go).
    """
    hashes = row_hashes(typed, fields)
    if labels is None:
        copies, _ = repeated(hashes, good)
        return hashes, copies, np.zeros(len(hashes), dtype=bool)
    _, group = repeated(hashes, good)
    rows = np.flatnonzero(good)
    contradicting = np.zeros(len(hashes), dtype=bool)
    contradicting[rows] = pd.Series(labels[rows]).groupby(group[rows]).transform("nunique").to_numpy() > 1
    # a duplicate repeats inputs and label: the label joins the hashed fields
    inputs = {name: typed[name] for name, _ in fields if name in typed}  # not the whole (wide) frame
    with_label = row_hashes(pd.DataFrame({**inputs, "_label": labels.astype(np.float64)}, copy=False),
                            [*fields, ("_label", False)])
    copies, _ = repeated(with_label, good)
    return hashes, copies & ~contradicting, contradicting


def near_duplicates(typed: pd.DataFrame, fields: list[tuple[str, bool]], good: np.ndarray, exact: np.ndarray,
                    config: RuleConfig) -> np.ndarray:
    """Rows equal to an earlier row once numbers are binned to `near_tolerance` x their field's
    robust standard deviation, and not already exact duplicates (a binning rule: two values either side of
    a bin edge are not matched, stated in the report)."""
    columns = {name: typed[name] for name, _ in fields if name in typed}
    for name, is_category in fields:
        if is_category or name not in typed:
            continue
        values = typed[name].to_numpy(dtype=np.float64, na_value=np.nan)
        spread = robust_spread(values[good])
        columns[name] = binned(values, config.near_tolerance * spread if np.isfinite(spread) else 0.0)
    rounded = pd.DataFrame(columns, copy=False)
    copies, _ = repeated(row_hashes(rounded, fields), good)
    return copies & ~exact


def leakage(hashes: np.ndarray, good: np.ndarray, *, reference_hashes: np.ndarray | None,
            fingerprint: RowFingerprint | None) -> dict[str, np.ndarray]:
    """Rows whose inputs also occur in another split: {split name: (rows,) bool}.

    reference_hashes: hashes of the training file given with the data; fingerprint: a model
    folder's record of its training and validation rows (sampled beyond MAX_HASHES rows: only
    rows whose hash falls in the sample can be found, the report states the share looked at).
    """
    found = {}
    if reference_hashes is not None:
        found["reference"] = good & np.isin(hashes, reference_hashes)
    if fingerprint is not None:
        for name, split in (("model_train", fingerprint.train), ("model_valid", fingerprint.valid)):
            found[name] = good & (hashes <= split.threshold) & np.isin(hashes, split.hashes)
    return found


def out_of_range(typed: pd.DataFrame, reference: pd.DataFrame, numeric: list[str], good: np.ndarray,
                 config: RuleConfig) -> np.ndarray:
    """(rows,) reasons ('' when in range): values beyond the training range by more than the margin."""
    reasons = np.full(len(typed), "", dtype=object)
    for name in numeric:
        ref = reference[name].to_numpy(dtype=np.float64, na_value=np.nan)
        ref = ref[np.isfinite(ref)]
        if len(ref) == 0:
            continue
        low, high = ref.min(), ref.max()
        margin = config.range_margin * max(high - low, 1e-12 * max(abs(low), abs(high), 1.0))
        value = typed[name].to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            outside = good & np.isfinite(value) & ((value < low - margin) | (value > high + margin))
        if outside.any():
            text = f"{name}: outside the training range [{low:.6g}, {high:.6g}]"
            reasons[outside] = np.where(reasons[outside] == "", text, reasons[outside] + "; " + text)
    return reasons
