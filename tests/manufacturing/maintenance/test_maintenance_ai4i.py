"""AI4I 2020 failure model: reading, scoring rows, metrics, save/load, ONNX parity."""

import numpy as np
import pandas as pd
import pytest

from manufacturing.maintenance.ai4i import (
    INPUTS,
    OUTPUTS,
    AI4IFailureModel,
    LightGBMParams,
    alert_metrics,
    generate_ai4i,
    read_ai4i,
    split_rows,
)
from manufacturing.maintenance.errors import MaintenanceDataError
from manufacturing.maintenance.export import ai4i_parity, export_ai4i_onnx


@pytest.fixture(scope="module")
def model():
    rows = generate_ai4i(3000, seed=0)
    train, val = split_rows(rows, seed=0)
    return AI4IFailureModel(progress=False, max_epochs=4, lightgbm=LightGBMParams(n_estimators=60)).fit(
        train, val_frame=val)


def test_real_file_counts(data_root):
    frame = read_ai4i(data_root / "ai4i2020")
    assert len(frame) == 8000 and int(frame["Machine failure"].sum()) == 271
    assert frame["Type"].value_counts().index.tolist()[0] == "L"


def test_scores_dataframes_dicts_and_lists(model):
    rows = generate_ai4i(50, seed=5)
    frame_probs = model.predict_proba(rows)
    assert list(frame_probs.columns) == OUTPUTS and len(frame_probs) == 50
    assert ((frame_probs >= 0) & (frame_probs <= 1)).all().all()
    one = {k: rows.iloc[3][k] for k in INPUTS}
    np.testing.assert_allclose(model.predict_proba(one).to_numpy()[0], frame_probs.to_numpy()[3], rtol=1e-6)
    listed = model.predict_proba([{k: rows.iloc[i][k] for k in INPUTS} for i in range(5)], backend="moe")
    np.testing.assert_allclose(listed.to_numpy(), model.predict_proba(rows.head(5), backend="moe").to_numpy(),
                               rtol=1e-5)
    # The failure rules are learnable: failing rows score above healthy ones.
    scored = generate_ai4i(2000, seed=6)
    probs = model.predict_proba(scored, backend="lightgbm")["failure"]
    assert probs[scored["Machine failure"] == 1].mean() > 5 * probs[scored["Machine failure"] == 0].mean()


def test_bad_rows_name_field_and_row(model):
    rows = generate_ai4i(5, seed=1)
    with pytest.raises(MaintenanceDataError, match="missing column.*Torque"):
        model.predict_proba(rows.drop(columns=["Torque [Nm]"]))
    bad = rows.astype({"Torque [Nm]": object})
    bad.loc[2, "Torque [Nm]"] = "strong"
    with pytest.raises(MaintenanceDataError, match=r"row 3, field 'Torque \[Nm\]': value 'strong'"):
        model.predict_proba(bad)
    odd = rows.copy()
    odd.loc[4, "Type"] = "X"
    with pytest.raises(MaintenanceDataError, match=r"row 5, field 'Type'.*L, M, H"):
        model.predict_proba(odd)


def test_alert_metrics():
    label = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 1])
    score = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.1, 0.0, 0.2, 0.7, 0.05])
    m = alert_metrics(score, label, alert_rate=0.3)  # flags the top 3: 0.9 (hit), 0.8 (hit), 0.7
    assert m["recall_at_alert"] == pytest.approx(2 / 3) and m["precision_at_alert"] == pytest.approx(2 / 3)
    assert 0 < m["pr_auc"] < 1 and m["positives"] == 3


def test_save_load_and_evaluate(model, tmp_path):
    model.save(tmp_path / "ai4i")
    loaded = AI4IFailureModel.load(tmp_path / "ai4i")
    rows = generate_ai4i(300, seed=3)
    for backend in ("lightgbm", "moe"):
        pd.testing.assert_frame_equal(loaded.predict_proba(rows, backend=backend),
                                      model.predict_proba(rows, backend=backend))
    metrics = loaded.evaluate(rows, alert_rate=0.05)
    assert set(metrics) >= {"lightgbm", "moe", "rows", "failures"}
    assert metrics["lightgbm"]["failure_recall_at_alert"] is not None


def test_onnx_parity_on_real_rows(model, data_root, tmp_path):
    rows = read_ai4i(data_root / "ai4i2020").sample(1000, random_state=0)
    differences = ai4i_parity(model, export_ai4i_onnx(model, tmp_path), rows)
    assert len(differences) == 1 + len(OUTPUTS)
    assert max(differences.values()) < 1e-4, differences
