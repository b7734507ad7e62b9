import gzip

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from finance.data import load_generated, load_gmsc, load_records, load_taiwan
from finance.errors import CreditDataError
from finance.generate import GeneratorConfig, generate, generate_population


def test_taiwan_loader_reads_the_real_file_and_a_folder(data_root):
    folder = load_taiwan(data_root / "taiwan_credit_default")
    file = load_taiwan(data_root / "taiwan_credit_default" / "UCI_Credit_Card.csv.gz")
    assert len(folder) == len(file) == 24_000
    assert 0.21 < folder.target.mean() < 0.23
    assert folder.frame["PAY_0"].between(-2, 9).all()


def test_gmsc_loader_keeps_sentinels_and_missing_incomes(data_root):
    records = load_gmsc(data_root / "give_me_some_credit")  # the folder: picks cs-training, not cs-test
    assert len(records) == 120_000 and 0.06 < records.target.mean() < 0.075
    assert records.frame["MonthlyIncome"].isna().sum() > 20_000
    assert records.frame["NumberOfTimes90DaysLate"].isin([96, 98]).any()
    unlabelled = load_gmsc(data_root / "give_me_some_credit" / "cs-test.csv.gz", require_target=False)
    assert unlabelled.target is None and len(unlabelled) == 101_503


def test_any_file_in_the_original_format_same_records(data_root, tmp_path):
    with gzip.open(data_root / "taiwan_credit_default" / "UCI_Credit_Card.csv.gz") as handle:
        sample = pd.read_csv(handle, nrows=300)
    sample.to_csv(tmp_path / "plain.csv", index=False)
    sample.to_parquet(tmp_path / "same.parquet", index=False)
    a, b = load_taiwan(tmp_path / "plain.csv"), load_taiwan(tmp_path / "same.parquet")
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert np.array_equal(a.target, b.target)


@pytest.mark.parametrize("column,value,message", [("AGE", "abc", "not a number"), ("PAY_0", 12, "above the maximum"),
                                                   ("LIMIT_BAL", None, "missing"),
                                                   ("default.payment.next.month", 3, "above the maximum")])
def test_bad_values_name_field_and_row(tmp_path, column, value, message):
    records = pd.DataFrame({"ID": [1, 2, 3], "LIMIT_BAL": [1e4] * 3, "SEX": [1, 2, 1], "EDUCATION": [1] * 3,
                            "MARRIAGE": [1] * 3, "AGE": [30] * 3,
                            **{p: [0] * 3 for p in ("PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6")},
                            **{f"BILL_AMT{i}": [100.0] * 3 for i in range(1, 7)},
                            **{f"PAY_AMT{i}": [50.0] * 3 for i in range(1, 7)},
                            "default.payment.next.month": [0, 1, 0]}).astype(object)
    records.loc[1, column] = value
    records.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CreditDataError) as error:
        load_taiwan(tmp_path / "bad.csv")
    assert error.value.field == column and error.value.row == 2 and message in str(error.value)


def test_missing_columns_and_unknown_dataset_are_clear_errors(tmp_path):
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(CreditDataError, match="missing column"):
        load_gmsc(tmp_path / "other.csv")
    with pytest.raises(CreditDataError, match="unknown dataset"):
        load_records("berka", tmp_path)


def test_generator_is_seeded_marked_and_defaults_depend_on_every_source(tmp_path):
    a = generate_population(GeneratorConfig(n_applicants=20_000, seed=3))
    b = generate_population(GeneratorConfig(n_applicants=20_000, seed=3))
    assert np.array_equal(a["transactions"]["statement_balance"], b["transactions"]["statement_balance"])
    folder = generate(tmp_path / "gen", GeneratorConfig(n_applicants=3_000, seed=1, part_rows=1_000))
    assert (folder / "GENERATED.md").exists()
    assert pq.read_schema(folder / "devices" / "part-00000.parquet").metadata[b"moeworks.generated"] == b"true"
    records = load_generated(folder)
    assert len(records) == 3_000 and records.frame["applicant_id"].is_unique
    y = records.target.astype(bool)
    frame = records.frame
    for column in ("bureau_score", "days_past_due_m1", "n_delinquent_contact", "accounts_on_device"):
        assert frame.loc[y, column].mean() != pytest.approx(frame.loc[~y, column].mean(), rel=0.05), column
