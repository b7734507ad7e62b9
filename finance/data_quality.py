"""Credit records (Taiwan, GMSC, the generated population) as a table for `moeworks data check`.

The rules are the loaders' own (`finance.schema.check_records` with each dataset's field specs),
applied to every row rather than stopping at the first bad one; rows are hashed on the same fields
as the scorers' row fingerprints, so leakage against a model folder compares like with like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.data_quality.table import CheckedTable, DataCheckError, write_csv_like
from finance.data import (
    DatasetSpec,
    check_columns,
    data_files,
    dataset_spec,
    is_generated_folder,
    read_table,
    typed_ids,
)
from finance.errors import CreditDataError
from finance.schema import FieldSpec, check_records, coerce

# The fields client segments are found on: size of the credit line, age, indebtedness and
# repayment, the axes along which banks segment their books.
SEGMENT_FIELDS = {
    "taiwan": ["LIMIT_BAL", "AGE", "BILL_AMT1", "PAY_AMT1", "PAY_0"],
    "gmsc": ["age", "MonthlyIncome", "DebtRatio", "RevolvingUtilizationOfUnsecuredLines",
             "NumberOfOpenCreditLinesAndLoans"],
    "generated": ["age", "monthly_income", "bureau_score", "existing_debt", "requested_amount"],
}
SEGMENTS = 6
GENERATED_TABLES = ("applications", "transactions", "social_edges", "devices")


def credit_table(dataset: str, path: str | Path) -> CheckedTable:
    """Read a Taiwan, GMSC or generated file (or the generated folder) for the checks.

    Unreadable files and missing columns raise DataCheckError; bad values become row reasons.
    """
    try:
        spec = dataset_spec(dataset)
        path = Path(path)
        files = data_files(path, spec)
        generated = is_generated_folder(path)
        if len(files) > 1 and not generated:
            raise DataCheckError(f"{path} holds {len(files)} data files; check one file at a time")
        frames = [read_table(file, spec) for file in files]
        raw = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        labelled = spec.target in raw.columns
        check_columns(raw, spec, str(path), require_target=labelled)
    except CreditDataError as error:
        raise DataCheckError(str(error)) from None
    if len(raw) == 0:
        raise DataCheckError(f"{path}: no data rows (a header only)")
    fields = list(spec.fields)
    if labelled:
        fields.append(FieldSpec(spec.target, "int", min=0, max=1))
    reasons = check_records(raw, [FieldSpec(spec.id_column, "category"), *fields]).to_numpy(dtype=object)
    typed = coerce(raw, fields)
    labels = None
    if labelled:
        target = typed[spec.target].to_numpy(dtype=np.float64, na_value=np.nan)
        labels = np.where(reasons == "", np.nan_to_num(target, nan=-1), -1).astype(np.int64)
    return CheckedTable(
        dataset=spec.name, source=str(path), raw=raw, typed=typed,
        fields=[(f.name, f.kind == "category") for f in spec.fields], rule_reasons=reasons, labels=labels,
        segment_fields=SEGMENT_FIELDS[spec.name], segments=SEGMENTS, label_name=spec.target,
        write=(lambda kept, out: _write_generated(path, kept, out, spec)) if generated else
        (lambda kept, out: _write_file(files[0], kept, out)),
        row_names=typed_ids(raw[spec.id_column].fillna("")).astype(str).to_numpy(dtype=object))


def _write_file(source: Path, kept: pd.DataFrame, out: Path) -> Path:
    """The kept rows in the input's format (a Parquet file keeps its schema)."""
    target = out / source.name
    if source.name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pandas(kept, preserve_index=False), target)
        return target
    return write_csv_like(source, kept, target)


def _write_generated(folder: Path, kept: pd.DataFrame, out: Path, spec: DatasetSpec) -> Path:
    """The generated folder's four tables, each part keeping only the kept applicants' rows."""
    ids = pa.array(kept[spec.id_column].to_numpy())
    target = out / folder.name
    for table in GENERATED_TABLES:
        (target / table).mkdir(parents=True, exist_ok=True)
        for part in sorted((folder / table).glob("*.parquet")):
            data = pq.read_table(part)
            pq.write_table(data.filter(pc.is_in(data["applicant_id"], value_set=ids.cast(data["applicant_id"].type))),
                           target / table / part.name, compression="snappy")
    for extra in sorted(p for p in folder.iterdir() if p.is_file()):  # the generator's metadata, as it was
        (target / extra.name).write_bytes(extra.read_bytes())
    return target

