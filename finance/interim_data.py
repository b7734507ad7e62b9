"""Readers for the two real credit files, used by the sequence model and reject inference until the
credit-scoring loaders land (then this module goes and callers import those instead).

Both accept any file in the dataset's original format (CSV, optionally gzipped) or a folder holding
it, and fail with `CreditDataError` naming the missing column.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

TAIWAN_FILE = "UCI_Credit_Card.csv.gz"
TAIWAN_TARGET = "default.payment.next.month"
GMSC_TRAIN_FILE = "cs-training.csv.gz"
GMSC_TEST_FILE = "cs-test.csv.gz"
GMSC_TARGET = "SeriousDlqin2yrs"
GMSC_FEATURES = [
    "RevolvingUtilizationOfUnsecuredLines", "age", "NumberOfTime30-59DaysPastDueNotWorse", "DebtRatio",
    "MonthlyIncome", "NumberOfOpenCreditLinesAndLoans", "NumberOfTimes90DaysLate",
    "NumberRealEstateLoansOrLines", "NumberOfTime60-89DaysPastDueNotWorse", "NumberOfDependents",
]
TAIWAN_COLUMNS = (["LIMIT_BAL", "SEX", "EDUCATION", "MARRIAGE", "AGE"]
                  + [f"PAY_{i}" for i in (0, 2, 3, 4, 5, 6)]
                  + [f"BILL_AMT{i}" for i in range(1, 7)] + [f"PAY_AMT{i}" for i in range(1, 7)])


class CreditDataError(ValueError):
    """A credit file that is not in its dataset's format; the message names the field."""


def _resolve(path: str | Path, default_name: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise CreditDataError(f"no such file: {path}")
    return path


def _require(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CreditDataError(f"{path.name}: missing column(s) {missing}")


def read_taiwan(path: str | Path) -> tuple[pd.DataFrame, pd.Series | None]:
    """Taiwan default of credit card clients -> (raw columns, label or None when the file has none)."""
    path = _resolve(path, TAIWAN_FILE)
    frame = pd.read_csv(path)
    _require(frame, TAIWAN_COLUMNS, path)
    label = frame[TAIWAN_TARGET].astype("int64") if TAIWAN_TARGET in frame.columns else None
    return frame[TAIWAN_COLUMNS].astype("float64"), label


def read_gmsc(path: str | Path, *, unlabelled_ok: bool = False) -> tuple[pd.DataFrame, pd.Series | None]:
    """Give Me Some Credit (cs-training / cs-test format) -> (features, label or None).

    The 96/98 codes of the three past-due counts are sentinels, not counts: they become NaN here so
    that every model sees them as missing rather than as 96 late payments.
    """
    path = _resolve(path, GMSC_TRAIN_FILE)
    frame = pd.read_csv(path, index_col=0)
    _require(frame, GMSC_FEATURES + [GMSC_TARGET], path)
    features = frame[GMSC_FEATURES].astype("float64")
    for column in GMSC_FEATURES:
        if "PastDue" in column or "90DaysLate" in column:
            features.loc[features[column] >= 96, column] = float("nan")
    label = frame[GMSC_TARGET]
    if label.isna().all():
        if not unlabelled_ok:
            raise CreditDataError(f"{path.name}: {GMSC_TARGET} is empty in every row (an unlabelled file)")
        return features, None
    if label.isna().any():
        row = int(label.isna().to_numpy().argmax())
        raise CreditDataError(f"{path.name}: {GMSC_TARGET} is missing in row {row + 1}")
    return features, label.astype("int64")
