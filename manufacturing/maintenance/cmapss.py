"""NASA C-MAPSS files: read, validate, label.

The files are space-separated, headerless, 26 columns per row (NASA's readme). This module names
them `unit`, `cycle`, `setting_1`..`setting_3`, `s_1`..`s_21`; every other part of
`manufacturing.maintenance` (and the twin's streaming feed) uses these names. Files may be plain
or gzipped (`.gz`). Train files run to failure; test files stop early and a RUL file gives the
true remaining life after each test unit's last cycle, one integer per line, in unit order.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from manufacturing.maintenance.errors import MaintenanceDataError

SETTINGS = [f"setting_{i}" for i in range(1, 4)]
SENSORS = [f"s_{i}" for i in range(1, 22)]
FLOAT32_MAX = float(np.finfo(np.float32).max)
COLUMNS = ["unit", "cycle", *SETTINGS, *SENSORS]
SUBSETS = ("FD001", "FD002", "FD003", "FD004")
# FD002 and FD004 run under six operating conditions (altitude, Mach, throttle); the others under one.
SUBSET_REGIMES = {"FD001": 1, "FD002": 6, "FD003": 1, "FD004": 6}


def _open_text(path: Path) -> str:
    if not path.is_file():
        raise MaintenanceDataError("file not found", source=str(path))
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:  # a truncated or corrupt gzip, an unreadable file
        raise MaintenanceDataError(f"cannot read the file: {error}", source=str(path)) from None
    return raw.decode("utf-8", errors="replace")


def validate_frame(frame: pd.DataFrame, *, source: str = "data", columns: list[str] | None = None) -> pd.DataFrame:
    """Check that `columns` (default: all 26 C-MAPSS columns) are present and numeric.

    Returns a copy with those columns as float64 (`unit`, `cycle` as int64), sorted by unit and
    cycle. Raises MaintenanceDataError naming the missing columns, or the first bad value's field
    and row (1-based, as in the file).
    """
    columns = COLUMNS if columns is None else columns
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MaintenanceDataError(f"missing column(s) {', '.join(missing)}; expected {', '.join(columns)}",
                                   source=source, field=missing[0])
    out = frame[columns].copy()
    for column in columns:
        values = pd.to_numeric(out[column], errors="coerce")
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        # the networks compute in float32: a larger magnitude would become infinity there
        bad = values.isna() | ~np.isfinite(numbers) | (np.abs(np.nan_to_num(numbers)) > FLOAT32_MAX)
        if bad.any():
            position = int(np.flatnonzero(bad.to_numpy())[0])
            shown = frame[column].iloc[position]
            raise MaintenanceDataError(f"value {shown!r} is not a finite number within float32's range", source=source,
                                       field=column, row=position + 1)
        out[column] = values.astype(float)
    for column in ("unit", "cycle"):
        if column in out:
            if (out[column] != out[column].round()).any() or (out[column] < 1).any():
                position = int(np.flatnonzero(((out[column] != out[column].round()) | (out[column] < 1)).to_numpy())[0])
                raise MaintenanceDataError("must be a positive integer", source=source, field=column,
                                           row=position + 1)
            out[column] = out[column].astype(np.int64)
    if "unit" in out and "cycle" in out:
        out = out.sort_values(["unit", "cycle"], kind="stable").reset_index(drop=True)
        if out.duplicated(["unit", "cycle"]).any():
            dup = out[out.duplicated(["unit", "cycle"])].iloc[0]
            raise MaintenanceDataError(f"unit {dup['unit']} has cycle {dup['cycle']} twice", source=source,
                                       field="cycle")
    return out


def read_cmapss(path: str | Path) -> pd.DataFrame:
    """Read one C-MAPSS train or test file (26 space-separated columns, plain or .gz).

    Returns a DataFrame with COLUMNS, sorted by unit and cycle. A wrong column count, a
    non-numeric value or a missing field raises MaintenanceDataError with the row and field.
    """
    path = Path(path)
    text = _open_text(path)
    rows = [line.split() for line in text.splitlines()]
    if not any(rows):
        raise MaintenanceDataError("file is empty", source=str(path))
    for number, fields in enumerate(rows, start=1):
        if fields and len(fields) != len(COLUMNS):
            if len(fields) < len(COLUMNS):
                absent = COLUMNS[len(fields):]
                message = f"{len(fields)} fields, expected {len(COLUMNS)}: missing {', '.join(absent)}"
                raise MaintenanceDataError(message, source=str(path), row=number, field=absent[0])
            raise MaintenanceDataError(f"{len(fields)} fields, expected {len(COLUMNS)} ({', '.join(COLUMNS)})",
                                       source=str(path), row=number)
    # Strings first, no NA guessing: a bad value is then reported as written ("n/a", not nan).
    frame = pd.read_csv(io.StringIO(text), sep=r"\s+", header=None, names=COLUMNS, dtype=str,
                        keep_default_na=False, skip_blank_lines=True)
    return validate_frame(frame, source=str(path))


def read_rul(path: str | Path) -> np.ndarray:
    """Read a RUL_FD00x file: one non-negative integer per test unit, in unit order. Returns (units,)."""
    path = Path(path)
    values = []
    for number, line in enumerate(_open_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            raise MaintenanceDataError(f"value {fields[0]!r} is not a number", source=str(path), row=number,
                                       field="rul") from None
        if len(fields) != 1 or value < 0 or not np.isfinite(value):
            raise MaintenanceDataError("expected one non-negative number per line", source=str(path),
                                       row=number, field="rul")
        values.append(value)
    if not values:
        raise MaintenanceDataError("file is empty", source=str(path))
    return np.asarray(values, dtype=np.float64)


def add_rul(frame: pd.DataFrame, *, cap: float | None = 125.0) -> pd.DataFrame:
    """Add `rul` to a run-to-failure frame: last cycle of the unit minus this cycle, capped.

    The cap makes the target piecewise linear (flat while the engine is healthy), the field's
    standard; pass cap=None for the raw count.
    """
    out = frame.copy()
    rul = out.groupby("unit")["cycle"].transform("max") - out["cycle"]
    out["rul"] = rul.clip(upper=cap).astype(float) if cap is not None else rul.astype(float)
    return out


def find_file(data: str | Path, kind: str, subset: str) -> Path:
    """Locate `{kind}_{subset}.txt[.gz]` in `data`, in `data/cmapss`, or `data` itself if it is a file."""
    data = Path(data)
    if data.is_file():
        return data
    for folder in (data, data / "cmapss"):
        for name in (f"{kind}_{subset}.txt", f"{kind}_{subset}.txt.gz"):
            if (folder / name).is_file():
                return folder / name
    raise MaintenanceDataError(f"no {kind}_{subset}.txt or .txt.gz in {data} or {data / 'cmapss'}",
                               source=str(data))


def last_cycles(frame: pd.DataFrame) -> pd.DataFrame:
    """The last row of each unit (where the official test is scored)."""
    return frame.groupby("unit", sort=True).tail(1).reset_index(drop=True)
