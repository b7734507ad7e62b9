"""Every loader refuses non-finite numbers and numbers beyond float32 (what the models compute in),
whatever the field, with the field and row named."""

import numpy as np
import pandas as pd
import pytest

from finance.data import GENERATED
from finance.schema import check_records
from manufacturing.maintenance.ai4i import validate_ai4i
from manufacturing.maintenance.cmapss import COLUMNS, validate_frame
from manufacturing.maintenance.errors import MaintenanceDataError

BAD = ["inf", "-Infinity", "1e309", "1e39", "-3.5e38"]


@pytest.mark.parametrize("value", BAD)
def test_credit_fields_refuse_non_finite_and_out_of_float32_text(value):
    frame = pd.DataFrame({"monthly_income": ["1000", value], "num_credit_lines": ["2", value]})
    reasons = check_records(frame, [f for f in GENERATED.fields if f.name in frame]).tolist()
    assert reasons[0] == ""
    assert "monthly_income: " in reasons[1] and "num_credit_lines: " in reasons[1]
    assert ("not a finite number" in reasons[1]) != ("outside the float32 range" in reasons[1])


def test_typed_parquet_columns_are_checked_too():
    frame = pd.DataFrame({"monthly_income": [1000.0, np.inf, -np.inf, 1e39, np.nan]})
    reasons = check_records(frame, [f for f in GENERATED.fields if f.name == "monthly_income"]).tolist()
    assert reasons == ["", "monthly_income: not a finite number ('inf')",
                       "monthly_income: not a finite number ('-inf')",
                       "monthly_income: outside the float32 range ('1e+39')", "monthly_income: missing"]


@pytest.mark.parametrize("value", BAD)
def test_ai4i_rows_refuse_them(value):
    row = {"UDI": 1, "Product ID": "M1", "Type": "M", "Air temperature [K]": 298.0, "Process temperature [K]": 308.0,
           "Rotational speed [rpm]": 1500, "Torque [Nm]": value, "Tool wear [min]": 3}
    with pytest.raises(MaintenanceDataError, match="row 1, field 'Torque \\[Nm\\]'"):
        validate_ai4i(row)


@pytest.mark.parametrize("value", BAD)
def test_cmapss_rows_refuse_them(value):
    frame = pd.DataFrame([[1, 1, *["0.5"] * (len(COLUMNS) - 2)], [1, 2, *["0.5"] * (len(COLUMNS) - 2)]],
                         columns=COLUMNS)
    frame.loc[1, "s_3"] = value
    with pytest.raises(MaintenanceDataError, match="row 2, field 's_3'"):
        validate_frame(frame)
