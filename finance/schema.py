"""Field rules of raw credit records, checked vectorised: one reason string per row.

The loaders raise on the first bad row; the batch job quarantines every bad row with its reasons.
Both use `check_records`, so "bad" means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# Models and ONNX graphs compute in float32: a larger magnitude becomes infinity there, so every
# numeric field is refused beyond it, whatever its own range (1e309, 'inf' and 'Infinity' parse to
# infinity in float64 and are refused as not finite).
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class FieldSpec:
    """One raw field: numeric with an allowed range, or categorical with allowed levels."""

    name: str
    kind: str = "float"  # "float", "int" (whole numbers) or "category"
    required: bool = True  # False: a missing value is allowed (e.g. GMSC's MonthlyIncome)
    min: float | None = None
    max: float | None = None
    levels: tuple[str, ...] | None = None  # allowed values of a category; None: any

    def __post_init__(self) -> None:
        if self.kind not in ("float", "int", "category"):
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")


def coerce(frame: pd.DataFrame, fields: list[FieldSpec]) -> pd.DataFrame:
    """Numeric fields to float64 (unparseable -> NaN), categories to str; other columns untouched.

    Columns already of the target type (a Parquet file's, a generated part's) are left as they are,
    and the frame is not copied (copy-on-write keeps `frame` itself unchanged).
    """
    converted = {}
    for spec in fields:
        if spec.name not in frame:
            continue
        col = frame[spec.name]
        if spec.kind == "category":
            if not (isinstance(col.dtype, pd.StringDtype) and col.dtype.na_value is np.nan):
                converted[spec.name] = col.where(col.isna(), col.astype(str))
        elif col.dtype != np.float64:
            converted[spec.name] = pd.to_numeric(col, errors="coerce").astype("float64")
    return frame.assign(**converted) if converted else frame.copy(deep=False)


def check_records(frame: pd.DataFrame, fields: list[FieldSpec]) -> pd.Series:
    """Reasons per row ('' when the row is good), e.g. "AGE: not a number ('abc'); LIMIT_BAL: missing".

    `frame` is the raw frame as read (strings allowed); missing columns are a frame-level error the
    caller checks first with `missing_columns`.
    """
    n = len(frame)
    reasons = np.full(n, "", dtype=object)
    for spec in fields:
        if spec.name not in frame:
            continue
        raw = frame[spec.name]
        numeric_dtype = pd.api.types.is_numeric_dtype(raw.dtype) or pd.api.types.is_bool_dtype(raw.dtype)
        if numeric_dtype:  # already typed (Parquet): no text to parse, only NaN is missing
            missing = raw.isna().to_numpy()
        else:
            text = raw.astype("string")
            missing = (raw.isna() | (text.str.strip() == "")).to_numpy(dtype=bool)
        problems: list[tuple[np.ndarray, object]] = []
        if spec.required:
            problems.append((missing, "missing"))
        if spec.kind == "category":
            if spec.levels is not None:
                bad = ~missing & ~raw.isin(spec.levels).to_numpy()
                problems.append((bad, lambda raw=raw: "unknown level " + raw.astype(str).map(repr)))
        else:
            value = (raw.to_numpy(dtype="float64", na_value=np.nan) if numeric_dtype
                     else pd.to_numeric(raw, errors="coerce").to_numpy(dtype="float64", na_value=np.nan))
            def shown(raw=raw) -> pd.Series:
                return "(" + raw.astype(str).str.slice(0, 30).map(repr) + ")"

            if not numeric_dtype:
                problems.append((~missing & np.isnan(value), lambda shown=shown: "not a number " + shown()))
            problems.append((np.isinf(value), lambda shown=shown: "not a finite number " + shown()))
            with np.errstate(invalid="ignore"):
                huge = np.isfinite(value) & (np.abs(value) > FLOAT32_MAX)
            problems.append((huge, lambda shown=shown: "outside the float32 range " + shown()))
            finite = np.isfinite(value) & ~huge
            if spec.kind == "int":
                problems.append((finite & (np.floor(value) != value), "not a whole number"))
            if spec.min is not None:
                problems.append((finite & (value < spec.min), f"below the minimum {spec.min:g}"))
            if spec.max is not None:
                problems.append((finite & (value > spec.max), f"above the maximum {spec.max:g}"))
        for mask, text in problems:
            if not mask.any():
                continue
            text_values = text().to_numpy(dtype=object)[mask] if callable(text) else text
            sep = np.where(reasons[mask] == "", "", "; ")
            reasons[mask] = reasons[mask] + sep + f"{spec.name}: " + text_values
    return pd.Series(reasons, index=frame.index, dtype=object)


def missing_columns(frame: pd.DataFrame, fields: list[FieldSpec]) -> list[str]:
    return [spec.name for spec in fields if spec.name not in frame.columns]
