"""Loaders of raw credit records: Taiwan default of credit card clients, Give Me Some Credit, and the
generated population. Each accepts any file in its dataset's original format (CSV, CSV.gz or Parquet,
a file or a folder of them), validates the fields and raises `CreditDataError` naming field and row.

A *record* is one applicant as one row of raw fields; the feature pipelines, the models' `score`
and the batch job all take records. The generated population is stored as four tables; reading it
joins them into records (the six months become `{field}_m1..m6` columns, the social links counts
per relation).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from finance import generate as gen
from finance.csv_records import read_error_reason
from finance.errors import CreditDataError
from finance.schema import FieldSpec, check_records, coerce

DATA_SUFFIXES = (".csv", ".csv.gz", ".parquet")
MISSING_TEXT = ["", "NA", "N/A", "NaN", "nan", "null", "NULL"]  # how CSV exports write a missing value


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's records look like: id, label and the fields with their rules."""

    name: str
    id_column: str
    target: str
    fields: tuple[FieldSpec, ...]
    preferred_files: tuple[str, ...] = ()  # globs picked first inside a folder (labelled files)
    months: int = 0  # length of the monthly sequences in a record (0: none)
    monthly_fields: tuple[str, ...] = field(default_factory=tuple)

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]


TAIWAN_PAY = ("PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6")  # there is no PAY_1; PAY_0 is September
TAIWAN = DatasetSpec(
    name="taiwan", id_column="ID", target="default.payment.next.month",
    fields=(FieldSpec("LIMIT_BAL", min=0), FieldSpec("SEX", "int", min=1, max=2),
            FieldSpec("EDUCATION", "int", min=0, max=6), FieldSpec("MARRIAGE", "int", min=0, max=3),
            FieldSpec("AGE", "int", min=18, max=120),
            *(FieldSpec(p, "int", min=-2, max=9) for p in TAIWAN_PAY),
            *(FieldSpec(f"BILL_AMT{i}") for i in range(1, 7)),
            *(FieldSpec(f"PAY_AMT{i}", min=0) for i in range(1, 7))),
    preferred_files=("UCI_Credit_Card*",), months=6)

GMSC_LATE = ("NumberOfTime30-59DaysPastDueNotWorse", "NumberOfTime60-89DaysPastDueNotWorse",
             "NumberOfTimes90DaysLate")
GMSC = DatasetSpec(
    name="gmsc", id_column="Id", target="SeriousDlqin2yrs",
    fields=(FieldSpec("RevolvingUtilizationOfUnsecuredLines", min=0), FieldSpec("age", "int", min=0, max=120),
            *(FieldSpec(c, "int", min=0, max=98) for c in GMSC_LATE),  # 96 and 98 are sentinel codes
            FieldSpec("DebtRatio", min=0), FieldSpec("MonthlyIncome", required=False, min=0),
            FieldSpec("NumberOfOpenCreditLinesAndLoans", "int", min=0),
            FieldSpec("NumberRealEstateLoansOrLines", "int", min=0),
            FieldSpec("NumberOfDependents", "int", required=False, min=0, max=50)),
    preferred_files=("cs-training*",))

_GEN_MONTHLY_RANGES = {"online_spend_share": (0, 1), "min_payment_missed": (0, 1), "days_past_due": (0, 180)}
GENERATED = DatasetSpec(
    name="generated", id_column="applicant_id", target=gen.TARGET,
    fields=(FieldSpec("employment_type", "category", levels=gen.SEGMENTS), FieldSpec("age", min=18, max=110),
            FieldSpec("monthly_income", min=0), FieldSpec("employment_years", min=0, max=80),
            FieldSpec("housing", "category", levels=gen.HOUSING),
            FieldSpec("education", "category", levels=gen.EDUCATION),
            FieldSpec("region", "category"), FieldSpec("channel", "category", levels=gen.CHANNELS),
            FieldSpec("requested_amount", min=0), FieldSpec("term_months", min=1, max=480),
            FieldSpec("existing_debt", min=0), FieldSpec("num_credit_lines", "int", min=0),
            FieldSpec("bureau_score", min=300, max=850), FieldSpec("inquiries_6m", "int", min=0),
            FieldSpec("num_dependents", "int", min=0, max=50), FieldSpec("years_at_address", min=0),
            *(FieldSpec(f"{f}_m{m}", min=_GEN_MONTHLY_RANGES.get(f, (0, None))[0],
                        max=_GEN_MONTHLY_RANGES.get(f, (0, None))[1])
              for f in gen.MONTHLY_FIELDS for m in range(1, gen.MONTHS + 1)),
            *(FieldSpec(f"n_{rel}", "int", min=0) for rel in gen.RELATIONS),
            *(FieldSpec(f"n_delinquent_{rel}", "int", min=0) for rel in gen.RELATIONS),
            FieldSpec("os", "category", levels=gen.OS_FAMILIES),
            *(FieldSpec(flag, "int", min=0, max=1) for flag in ("is_emulator", "is_rooted", "ip_geo_mismatch",
                                                               "ip_is_proxy")),
            FieldSpec("accounts_on_device", min=0), FieldSpec("geo_distance_km", min=0),
            FieldSpec("device_age_days", min=0), FieldSpec("application_hour", "int", min=0, max=23),
            FieldSpec("form_fill_seconds", min=0)),
    months=gen.MONTHS, monthly_fields=gen.MONTHLY_FIELDS)

DATASETS = {spec.name: spec for spec in (TAIWAN, GMSC, GENERATED)}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise CreditDataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}", field="dataset")
    return DATASETS[name]


@dataclass
class Records:
    """Validated raw records of one dataset. frame: (n, fields) with the id column first."""

    dataset: str
    frame: pd.DataFrame
    target: np.ndarray | None  # (n,) int 0/1, or None for unlabelled records

    @property
    def ids(self) -> np.ndarray:
        return self.frame[dataset_spec(self.dataset).id_column].to_numpy()

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def xy(self) -> tuple[pd.DataFrame, np.ndarray | None]:
        """(frame, target): what an estimator's fit takes, e.g. `scorer.fit(*train.xy, eval_set=[valid.xy])`."""
        return self.frame, self.target

    def take(self, rows: np.ndarray) -> Records:
        """The records at positions `rows` (an index array or slice), renumbered from 0."""
        return Records(self.dataset, self.frame.iloc[rows].reset_index(drop=True),
                       None if self.target is None else self.target[rows])


# ----------------------------------------------------------------------------------------------
# Files


def is_generated_folder(path: Path) -> bool:
    return path.is_dir() and (path / "applications").is_dir()


def data_files(path: str | Path, spec: DatasetSpec) -> list[Path]:
    """The data files a path stands for: the file itself, or a folder's (preferred) data files."""
    path = Path(path)
    if not path.exists():
        raise CreditDataError(f"no such file or folder: {path}", field="data")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CreditDataError(f"{path} is neither a regular file nor a folder", field="data")
    if is_generated_folder(path):
        return sorted((path / "applications").glob("*.parquet"))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    preferred = [p for p in files if any(p.match(g) for g in spec.preferred_files)]
    chosen = preferred or files
    if not chosen:
        raise CreditDataError(f"no CSV, CSV.gz or Parquet files in {path}", field="data")
    return chosen


def _normalise_columns(frame: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    if spec is GMSC and spec.id_column not in frame.columns:
        first = str(frame.columns[0])
        if first == "" or first.startswith("Unnamed"):  # Kaggle's file has an unnamed id column
            frame = frame.rename(columns={frame.columns[0]: spec.id_column})
    return frame


def read_table(file: Path, spec: DatasetSpec) -> pd.DataFrame:
    """One whole file as read (strings kept as strings so that checks can name bad values).

    A file that cannot be read (empty, bad gzip, not UTF-8, broken CSV or Parquet) raises
    CreditDataError with the reason.
    """
    try:
        if file.name.endswith(".parquet"):
            if file.parent.name == "applications" and is_generated_folder(file.parent.parent):
                return assemble_generated_part(file.parent.parent, file.name)
            return _normalise_columns(pq.read_table(file).to_pandas(), spec)
        return _normalise_columns(pd.read_csv(file, dtype=str, keep_default_na=False, na_values=MISSING_TEXT,
                                              index_col=False), spec)
    except pd.errors.EmptyDataError:
        raise CreditDataError("empty file: no header and no rows", source=str(file)) from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, pd.errors.ParserError, pa.ArrowException,
            ValueError) as error:
        raise CreditDataError(f"cannot read the file: {read_error_reason(error)}", source=str(file)) from None


def parse_csv_bytes(data: bytes, spec: DatasetSpec) -> pd.DataFrame:
    """Records from CSV bytes (a header and whole records), read as `read_table` reads a file."""
    return _normalise_columns(pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False,
                                          na_values=MISSING_TEXT, index_col=False), spec)


def file_columns(file: Path, spec: DatasetSpec, header: bytes | None = None) -> list[str]:
    """The column names of a data file (after the GMSC unnamed-id rename). CSV: from `header`."""
    if file.name.endswith(".parquet"):
        if file.parent.name == "applications" and is_generated_folder(file.parent.parent):
            return [spec.id_column, *spec.field_names]  # assembled from the generator's own tables
        names = pq.ParquetFile(file).schema_arrow.names
    else:
        names = list(pd.read_csv(io.BytesIO(header or b""), dtype=str, nrows=0, index_col=False).columns)
    return list(_normalise_columns(pd.DataFrame(columns=names), spec).columns)


def read_parquet_records(file: Path, spec: DatasetSpec) -> pd.DataFrame:
    """A whole Parquet file (or a generated part, joined) as records."""
    if file.parent.name == "applications" and is_generated_folder(file.parent.parent):
        return assemble_generated_part(file.parent.parent, file.name)
    return _normalise_columns(pq.read_table(file).to_pandas(), spec)


def read_ids(file: Path, spec: DatasetSpec, columns: list[str]) -> pd.Series:
    """The id column of a whole file as text ('' when missing), for finding repeated ids."""
    position = columns.index(spec.id_column)
    if file.name.endswith(".parquet"):
        if file.parent.name == "applications" and is_generated_folder(file.parent.parent):
            values = pq.read_table(file, columns=["applicant_id"]).column(0).to_pandas()
        else:
            values = pq.read_table(file, columns=[pq.ParquetFile(file).schema_arrow.names[position]]).column(
                0).to_pandas()
    else:
        values = pd.read_csv(file, dtype=str, keep_default_na=False, usecols=[position], index_col=False,
                             encoding="utf-8").iloc[:, 0]
    return values


# ----------------------------------------------------------------------------------------------
# Validation


def check_columns(frame: pd.DataFrame, spec: DatasetSpec, source: str, *, require_target: bool) -> None:
    needed = [spec.id_column, *spec.field_names] + ([spec.target] if require_target else [])
    absent = [c for c in needed if c not in frame.columns]
    if absent:
        raise CreditDataError(f"missing column(s) {absent[:5]}{' ...' if len(absent) > 5 else ''}; "
                              f"is this a {spec.name} file?", field=absent[0], source=source)


def validate(frame: pd.DataFrame, spec: DatasetSpec, source: str, *, require_target: bool,
             first_row: int = 1) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Checked, typed records and labels; raises CreditDataError at the first bad row."""
    check_columns(frame, spec, source, require_target=require_target)
    fields = list(spec.fields)
    if require_target:
        fields.append(FieldSpec(spec.target, "int", min=0, max=1))
    reasons = check_records(frame, fields)
    bad = np.flatnonzero(reasons.to_numpy() != "")
    if len(bad):
        first = reasons.iloc[bad[0]]
        raise CreditDataError(first.split(": ", 1)[1], field=first.split(":", 1)[0],
                              row=first_row + int(bad[0]), source=source)
    typed = coerce(frame, fields)
    typed[spec.id_column] = typed_ids(typed[spec.id_column])
    target = typed.pop(spec.target).to_numpy(dtype=np.int64) if require_target else None
    typed = typed.drop(columns=[spec.target], errors="ignore")
    return typed[[spec.id_column, *spec.field_names]].reset_index(drop=True), target


def typed_ids(values: pd.Series) -> pd.Series:
    """Ids as int64 when they are all whole numbers (CSV and Parquet then agree), else as text."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and (numeric % 1 == 0).all():
        return numeric.astype("int64")
    return values.astype(str)


def load_records(dataset: str, path: str | Path, *, require_target: bool = True) -> Records:
    """Every record under `path`, validated. require_target: the label must be present and 0/1."""
    spec = dataset_spec(dataset)
    frames, targets = [], []
    for file in data_files(path, spec):
        frame, target = validate(read_table(file, spec), spec, str(file), require_target=require_target)
        frames.append(frame)
        targets.append(target)
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if len(frame) == 0:
        raise CreditDataError("no data rows (a header only)", source=str(path))
    return Records(spec.name, frame, np.concatenate(targets) if require_target else None)


def load_taiwan(path: str | Path, *, require_target: bool = True) -> Records:
    """UCI_Credit_Card.csv(.gz) or any file of that format (columns ID, LIMIT_BAL, ..., default.payment.next.month)."""
    return load_records("taiwan", path, require_target=require_target)


def load_gmsc(path: str | Path, *, require_target: bool = True) -> Records:
    """cs-training.csv(.gz) or any file of that format. Sentinels 96/98 and missing incomes are kept
    as they are here; the GMSC feature pipeline turns them into flags."""
    return load_records("gmsc", path, require_target=require_target)


def load_generated(path: str | Path, *, require_target: bool = True) -> Records:
    """A folder written by `finance.generate` (or a file of its records)."""
    return load_records("generated", path, require_target=require_target)


# ----------------------------------------------------------------------------------------------
# The generated population: four tables -> one record per applicant


def assemble_generated_part(folder: Path, part: str) -> pd.DataFrame:
    """Join part `part` of the four generated tables into records (one row per applicant).

    Read with pyarrow straight into numpy (only the applications and the device fingerprints go
    through pandas), and made one frame in one constructor call: the join of a 250,000-applicant
    part was a fifth of the batch job's time when every table went through pandas first.
    """
    apps = pq.read_table(folder / "applications" / part).to_pandas()
    ids = apps["applicant_id"].to_numpy()
    n = len(ids)
    txn = pq.read_table(folder / "transactions" / part, columns=["applicant_id", "month", *gen.MONTHLY_FIELDS])
    txn_ids = txn["applicant_id"].to_numpy()
    row = np.searchsorted(ids, txn_ids)
    month = txn["month"].to_numpy() - 1
    ok = (row < n) & (ids[np.minimum(row, n - 1)] == txn_ids) & (month >= 0) & (month < gen.MONTHS)
    row, month = row[ok], month[ok]
    columns: dict[str, Any] = {name: apps[name] for name in apps.columns}
    for name in gen.MONTHLY_FIELDS:
        matrix = np.full((gen.MONTHS, n), np.nan)  # month-major: each month's column is contiguous
        matrix[month, row] = txn[name].to_numpy(zero_copy_only=False).astype(np.float64, copy=False)[ok]
        columns.update((f"{name}_m{m + 1}", matrix[m]) for m in range(gen.MONTHS))
    edges = pq.read_table(folder / "social_edges" / part, columns=["applicant_id", "relation", "contact_delinquent"])
    erow = np.searchsorted(ids, edges["applicant_id"].to_numpy()).clip(0, n - 1)
    delinquent = pc.fill_null(edges["contact_delinquent"], False).to_numpy(zero_copy_only=False)
    for rel in gen.RELATIONS:
        is_rel = pc.fill_null(pc.equal(edges["relation"], rel), False).to_numpy(zero_copy_only=False)
        columns[f"n_{rel}"] = np.bincount(erow[is_rel], minlength=n).astype(np.float64)
        columns[f"n_delinquent_{rel}"] = np.bincount(erow[is_rel & delinquent], minlength=n).astype(np.float64)
    devices = pq.read_table(folder / "devices" / part)
    device_ids, first = np.unique(devices["applicant_id"].to_numpy(), return_index=True)  # the first per applicant
    at = np.searchsorted(device_ids, ids).clip(0, max(len(device_ids) - 1, 0))
    found = (at < len(device_ids)) & (device_ids[at] == ids) if len(device_ids) else np.zeros(n, dtype=bool)
    taken = devices.drop_columns(["applicant_id", "device_id"]).take(
        pa.array(first[at] if len(device_ids) else np.zeros(n, dtype=np.int64), mask=~found)).to_pandas()
    if not found.all():  # an applicant without a fingerprint: NaN, as a reindex gives (integers become float)
        taken = taken.astype({c: "float64" for c, t in taken.dtypes.items() if pd.api.types.is_integer_dtype(t)})
    for flag in ("is_emulator", "is_rooted", "ip_geo_mismatch", "ip_is_proxy"):
        taken[flag] = taken[flag].astype("float64")
    columns.update((name, taken[name]) for name in taken.columns)
    return pd.DataFrame(columns, copy=False)  # no consolidation into one block: that copy cost more than the join
