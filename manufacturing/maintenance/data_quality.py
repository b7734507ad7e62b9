"""AI4I 2020 and C-MAPSS files as tables for `moeworks data check`.

The rules are the loaders' validators (`validate_ai4i`, `cmapss.validate_frame`) run over every
row (core.data_quality.table.reasons_from_validator). AI4I rows are hashed on the fields of the
AI4I model's row fingerprint; C-MAPSS rows on their settings and sensors (unit and cycle are
names, not measurements). C-MAPSS regimes are found as the RUL features find them: k-means on the
three operating settings, the number chosen from the data (six for FD002/FD004, one otherwise).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from core.data_quality.table import CheckedTable, DataCheckError, reasons_from_validator, write_csv_like
from manufacturing.maintenance.ai4i import INPUTS, LABELS, NUMERIC_INPUTS, features, validate_ai4i
from manufacturing.maintenance.cmapss import COLUMNS, SENSORS, SETTINGS, validate_frame
from manufacturing.maintenance.errors import MaintenanceDataError

AI4I_SEGMENTS = 4  # machine operating points (speed, torque, temperatures): a handful, not a hundred


def _ai4i_file(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.glob("ai4i2020.csv*")) or sorted(path.glob("*.csv*"))
        if not found:
            raise DataCheckError(f"{path}: no ai4i2020.csv[.gz] in this folder")
        path = found[0]
    if not path.is_file():
        raise DataCheckError(f"{path}: file not found")
    return path


def ai4i_table(path: str | Path) -> CheckedTable:
    file = _ai4i_file(Path(path))
    try:
        raw = pd.read_csv(file, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataCheckError(f"{file}: empty file: no header and no rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, zlib.error) as error:
        raise DataCheckError(f"{file}: not a readable CSV: {' '.join(str(error).split())[:200]}") from None
    if raw.empty:
        raise DataCheckError(f"{file}: no data rows (a header only)")
    labelled = all(c in raw.columns for c in LABELS)
    try:
        validate_ai4i(raw.iloc[:0], source=str(file), labels=labelled)  # the columns, once, as the loader wants them
    except MaintenanceDataError as error:
        raise DataCheckError(str(error)) from None
    reasons = reasons_from_validator(raw, lambda rows: validate_ai4i(rows, labels=labelled), MaintenanceDataError)
    numbers = NUMERIC_INPUTS + (LABELS if labelled else [])
    typed = raw.assign(**{c: pd.to_numeric(raw[c], errors="coerce") for c in numbers})
    typed["Type"] = typed["Type"].astype(str).str.strip()
    numeric, codes = features(typed)
    model_inputs = pd.DataFrame(numeric, columns=[f"x{i}" for i in range(numeric.shape[1])]).assign(
        type_code=codes)
    labels = None
    if labelled:
        labels = np.where(reasons == "", typed["Machine failure"].fillna(-1), -1).astype(np.int64)
    return CheckedTable(
        dataset="ai4i", source=str(file), raw=raw, typed=typed, fields=[(name, name == "Type") for name in INPUTS],
        rule_reasons=reasons, labels=labels, segment_fields=list(NUMERIC_INPUTS), segments=AI4I_SEGMENTS,
        label_name="Machine failure", label_inputs=model_inputs,
        write=lambda kept, out: write_csv_like(file, kept, out / file.name, missing=""),
        row_names=raw["UDI"].to_numpy(dtype=object) if "UDI" in raw else None)


def _cmapss_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataCheckError(f"{path}: file not found")
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataCheckError(f"{path}: cannot read the file: {error}") from None
    lines = [line for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise DataCheckError(f"{path}: file is empty")
    return lines


def cmapss_table(path: str | Path) -> CheckedTable:
    """One C-MAPSS train or test file: a row per non-blank line, kept verbatim for --fix."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("train_FD00*.txt*"))
        if len(found) != 1:
            raise DataCheckError(f"{path}: give one C-MAPSS file (this folder holds {len(found)} train files)")
        path = found[0]
    lines = _cmapss_lines(path)
    split = [line.split() for line in lines]
    counts = np.array([len(fields) for fields in split])
    reasons = np.full(len(lines), "", dtype=object)
    wrong = counts != len(COLUMNS)
    reasons[wrong] = [f"{c} fields, expected {len(COLUMNS)}" for c in counts[wrong]]
    if wrong.mean() > 0.5:
        raise DataCheckError(f"{path}: {int(wrong.sum())} of {len(lines)} lines do not have the {len(COLUMNS)} "
                             "space-separated fields of a C-MAPSS file")
    padded = [fields if len(fields) == len(COLUMNS) else [""] * len(COLUMNS) for fields in split]
    text = pd.DataFrame(padded, columns=COLUMNS)
    repeat = ~wrong & text.duplicated(["unit", "cycle"]).to_numpy() & (text["unit"] != "").to_numpy()
    reasons[repeat] = "cycle: the unit has this cycle on an earlier line"
    checkable = np.flatnonzero(reasons == "")
    reasons[checkable] = reasons_from_validator(text.iloc[checkable].reset_index(drop=True),
                                                lambda rows: validate_frame(rows), MaintenanceDataError)
    typed = text.apply(pd.to_numeric, errors="coerce")
    return CheckedTable(
        dataset="cmapss", source=str(path), raw=pd.DataFrame({"line": lines}), typed=typed,
        fields=[(name, False) for name in SETTINGS + SENSORS], rule_reasons=reasons, labels=None,
        segment_fields=list(SETTINGS), segments=None,
        write=lambda kept, out: _write_lines(path, kept["line"], out),
        notes=["no labels: C-MAPSS's remaining life is counted from the cycles, there is nothing for level 3 to "
               "check"],
        row_names=(text["unit"] + ":" + text["cycle"]).to_numpy(dtype=object))


def _write_lines(source: Path, lines: pd.Series, out: Path) -> Path:
    target = out / source.name
    data = ("\n".join(lines) + "\n").encode()
    target.write_bytes(gzip.compress(data) if source.name.endswith(".gz") else data)
    return target
