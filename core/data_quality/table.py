"""What a dataset adapter hands to the checks: the rows as read, their typed fields and labels."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


class DataCheckError(ValueError):
    """Input the check cannot read at all (the CLI prints it on one line and exits 2)."""


@dataclass(kw_only=True)
class CheckedTable:
    """One dataset file (or folder) ready for the checks; row i is the file's data row i + 1.

    raw: the rows as read (text kept as text), what `--fix` writes back without the removed rows.
    typed: (rows, fields) the input fields typed (numbers float64, NaN where the rules fail,
    categories str); the checks read only `fields` from it.
    fields: (name, is_category) of the inputs that define a row (ids and labels left out, as in
    core.row_fingerprint, so a copy under a new id is still a duplicate).
    rule_reasons: (rows,) '' when the row passes the loader's checks, else the reasons.
    labels: (rows,) int class per row, -1 where missing or invalid; None for unlabelled data.
    segment_fields: numeric fields the domains are discovered on; segments: their number
    (None: chosen from the data, for regimes that form well separated clusters).
    write: writes kept raw rows into a folder in the input's own format; returns the written path.
    """

    dataset: str
    source: str
    raw: pd.DataFrame
    typed: pd.DataFrame
    fields: list[tuple[str, bool]]
    rule_reasons: np.ndarray
    labels: np.ndarray | None
    segment_fields: list[str]
    segments: int | None
    write: Callable[[pd.DataFrame, Path], Path]
    label_name: str = "label"
    perceptual: np.ndarray | None = None  # (rows,) uint64 image hashes: near copies by bits differing
    label_inputs: pd.DataFrame | None = None  # (rows, features) level 3's model inputs, when not the fields
    label_check: bool = True  # False where a tabular model of `typed` cannot judge the labels (images)
    # level 3 done by the adapter (defect boxes): ((rows,) issues, (rows,) label quality, method)
    given_label_issues: tuple[np.ndarray, np.ndarray, str] | None = None
    notes: list[str] = field(default_factory=list)  # what this dataset's check cannot do, said plainly
    row_names: np.ndarray | None = None  # (rows,) what the report calls each row (an image file), else its number

    def __post_init__(self) -> None:
        n = len(self.raw)
        if len(self.typed) != n or len(self.rule_reasons) != n or (self.labels is not None and len(self.labels) != n):
            raise ValueError("raw, typed, rule_reasons and labels must have one entry per row")

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def numeric_fields(self) -> list[str]:
        return [name for name, is_category in self.fields if not is_category]

    @property
    def good(self) -> np.ndarray:
        """(rows,) bool: rows that pass the loader's checks (the only rows the later checks read)."""
        return self.rule_reasons == ""


def reasons_from_validator(frame: pd.DataFrame, validate: Callable[[pd.DataFrame], object],
                           error_type: type[Exception], *, block: int = 512, max_bad_rows: int = 1000) -> np.ndarray:
    """Per-row reasons from a loader's validator that raises at its first bad row.

    The validator is the loader's own (so "bad" means what it means when the product reads the
    file); it names one row per call, so each failing block is revalidated without that row until
    it passes. Blocks keep each call small. A frame-level error (no row: a missing column) and
    more than `max_bad_rows` failing rows (not a file of this dataset) raise DataCheckError.
    """
    reasons = np.full(len(frame), "", dtype=object)
    bad_count = 0
    for start in range(0, len(frame), block):
        positions = np.arange(start, min(start + block, len(frame)))
        while len(positions):
            try:
                validate(frame.iloc[positions])
                break
            except error_type as error:
                row = getattr(error, "row", None)
                if row is None:
                    raise DataCheckError(str(error)) from None
                bad = positions[int(row) - 1]
                field_name = getattr(error, "field", None)
                text = str(error)
                message = text.split(": ", 1)[1] if ": " in text else text  # drop "file, row (of the block)"
                reasons[bad] = f"{field_name}: {message}" if field_name else message
                positions = positions[positions != bad]
                bad_count += 1
                if bad_count > max_bad_rows:
                    first = int(np.flatnonzero(reasons != "")[0])
                    raise DataCheckError(f"more than {max_bad_rows} rows fail the loader's checks (first: row "
                                         f"{first + 1}, {reasons[first]}); is this the right dataset?") from None
    return reasons


def write_csv_like(source: Path, kept: pd.DataFrame, target: Path, *, missing: str = "NA") -> Path:
    """Kept rows (read as text) written as `source` was: its header line verbatim (an unnamed id
    column stays unnamed, a byte-order mark stays), gzip when it was gzipped, missing values as
    `missing` (a text every loader reads as missing)."""
    gzipped = source.name.endswith(".gz")
    with (gzip.open(source, "rb") if gzipped else open(source, "rb")) as stream:
        header = stream.readline()
    with (gzip.open(target, "wb") if gzipped else open(target, "wb")) as stream:
        stream.write(header if header.endswith(b"\n") else header + b"\n")
        stream.write(kept.to_csv(header=False, index=False, na_rep=missing, lineterminator="\n").encode("utf-8"))
    return target
