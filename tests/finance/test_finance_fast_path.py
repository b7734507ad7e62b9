"""One application scored alone gets exactly what it gets in a batch, and every fast path equals the
simple reference it replaced (optbinning's transform, sklearn's probabilities, np.nan* statistics)."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finance.data import Records, assemble_generated_part, load_generated, load_taiwan
from finance.evaluation import (
    characteristic_reference,
    characteristic_shares,
    characteristic_stability,
    evaluate_scorer,
)
from finance.features import _TIME, _window_stats
from finance.generate import GeneratorConfig, generate
from finance.models import FitData
from finance.models.base import logistic_proba
from finance.models.ensemble import EnsembleModel
from finance.models.moe import MoEModelConfig
from finance.scorer import CreditScorer, load_model, split_records

SMALL_MOE = MoEModelConfig(num_experts=16, hidden_size=32, intermediate_size=64, max_epochs=2, patience=1)


@pytest.fixture(scope="module")
def taiwan(data_root):
    records = load_taiwan(data_root / "taiwan_credit_default")
    sample = records.take(np.random.default_rng(3).permutation(len(records))[:4000])
    train, valid = split_records(sample, valid_share=0.3, seed=0)
    scorers = {name: CreditScorer(dataset="taiwan", model_name=name, model_config=SMALL_MOE if name == "moe" else None)
               .fit(*train.xy, eval_set=[valid.xy]) for name in ("scorecard", "lightgbm", "moe")}
    return records, scorers


def _alone(scorer, frame, rows):
    return pd.concat([scorer.score(frame.iloc[[i]], reasons="all") for i in rows], ignore_index=True)


@pytest.mark.parametrize("name", ["scorecard", "lightgbm"])
def test_one_application_alone_scores_exactly_as_in_a_batch(taiwan, name):
    records, scorers = taiwan
    scorer = scorers[name]
    frame = records.frame  # > 16,384 rows: the batch transform works in several row blocks
    assert len(frame) > 16_385
    rows = [0, 1, 7, 16_383, 16_384, 16_385, len(frame) - 1]  # block edges included
    batch = scorer.score(frame, reasons="all").iloc[rows].reset_index(drop=True)
    pd.testing.assert_frame_equal(_alone(scorer, frame, rows), batch, check_exact=True)
    assert (batch["reason_1"].str.len() > 0).any()
    declined = scorer.score(frame.iloc[:500], reasons="declined")  # reasons for a subset: the same texts
    full = scorer.score(frame.iloc[:500], reasons="all")
    mask = declined["decision"] == "decline"
    pd.testing.assert_frame_equal(declined[mask], full[mask], check_exact=True)
    assert (declined.loc[~mask, "reason_codes"] == "").all()


def test_generated_applications_alone_score_exactly_as_in_a_batch(tmp_path):
    records = load_generated(generate(tmp_path / "g", GeneratorConfig(n_applicants=2_500, seed=11)))
    train, valid = split_records(records, seed=0)
    scorer = CreditScorer(dataset="generated", model_name="lightgbm").fit(*train.xy, eval_set=[valid.xy])
    rows = list(range(0, 2_500, 250))
    batch = scorer.score(records.frame, reasons="all").iloc[rows].reset_index(drop=True)
    pd.testing.assert_frame_equal(_alone(scorer, records.frame, rows), batch, check_exact=True)
    X = scorer.pipeline_.transform(records.frame)
    np.testing.assert_array_equal(np.vstack([scorer.pipeline_.transform(records.frame.iloc[[i]]) for i in rows]),
                                  X[rows])


def test_moe_alone_matches_the_batch_to_float_precision(taiwan):
    """Torch's matrix products round differently for 1 and n rows, so the MoE network (and an
    ensemble holding it) agrees to float32 precision, not bit for bit."""
    records, scorers = taiwan
    frame = records.frame.iloc[:40]
    batch = scorers["moe"].score(frame, reasons="none")
    np.testing.assert_allclose(_alone(scorers["moe"], frame, range(40))["pd"], batch["pd"], rtol=1e-5)


def test_scorecard_lookup_tables_give_optbinnings_woe(taiwan):
    records, scorers = taiwan
    model = scorers["scorecard"].model_
    X = scorers["scorecard"].pipeline_.transform(records.frame.iloc[:3000]).copy()
    X[::7, model.columns_[0]] = np.nan  # missing values have a WoE of their own
    for j, name in zip(model.columns_, model.selected_, strict=True):  # values exactly on the split points
        splits = model.binning_.get_binned_variable(name).splits
        X[: len(splits), j] = splits
    expected = np.column_stack([model.binning_.get_binned_variable(name).transform(X[:, j].astype(np.float64),
                                                                                  metric="woe")
                                for name, j in zip(model.selected_, model.columns_, strict=True)])
    np.testing.assert_array_equal(model._woe(X), expected)
    np.testing.assert_allclose(logistic_proba(expected, model.logistic_), model.logistic_.predict_proba(expected),
                               rtol=1e-13, atol=1e-15)


def test_window_statistics_equal_the_nan_aware_reference():
    rng = np.random.default_rng(0)
    m = rng.normal(100, 30, size=(6, 3, 400))  # (months, series, applicants)
    m[rng.random(m.shape) < 0.15] = np.nan
    complete = ~np.isnan(m).any(axis=(0, 1))
    m[:, :, :5] = 7.0  # flat series
    m[:, :, 5] = np.nan  # nothing at all
    complete[:5], complete[5] = True, False
    for window in (3, 6):
        got = _window_stats(m[:window], complete)
        t = _TIME[-window:]
        for s in range(3):
            for i in range(400):
                v = m[:window, s, i]
                ok = ~np.isnan(v)
                if not ok.any():
                    assert np.isnan([got[k][s, i] for k in ("mean", "std", "max", "min", "slope")]).all()
                    continue
                np.testing.assert_allclose([got["mean"][s, i], got["std"][s, i], got["max"][s, i], got["min"][s, i]],
                                           [v[ok].mean(), v[ok].std(), v[ok].max(), v[ok].min()], rtol=1e-12,
                                           atol=1e-12)
                slope = np.polyfit(t[ok], v[ok], 1)[0] if ok.sum() > 1 else np.nan
                np.testing.assert_allclose(got["slope"][s, i], slope, rtol=1e-9, atol=1e-12)


def test_generated_join_leaves_gaps_missing(tmp_path):
    folder = generate(tmp_path / "g", GeneratorConfig(n_applicants=300, seed=3))
    part = "part-00000.parquet"
    full = assemble_generated_part(folder, part)
    devices = pq.read_table(folder / "devices" / part)
    pq.write_table(devices.filter(pa.array(np.asarray(devices["applicant_id"]) != 5)), folder / "devices" / part)
    txn = pq.read_table(folder / "transactions" / part)
    keep = ~((np.asarray(txn["applicant_id"]) == 9) & (np.asarray(txn["month"]) == 2))
    pq.write_table(txn.filter(pa.array(keep)), folder / "transactions" / part)
    gappy = assemble_generated_part(folder, part)
    row5, row9 = (np.flatnonzero(full["applicant_id"].to_numpy() == i)[0] for i in (5, 9))
    assert gappy.loc[row5, ["os", "accounts_on_device", "is_rooted"]].isna().all()
    assert np.isnan(gappy.loc[row9, "card_spend_m2"]) and not np.isnan(full.loc[row9, "card_spend_m2"])
    same = gappy.drop(index=[row5, row9])
    pd.testing.assert_frame_equal(same, full.drop(index=[row5, row9]), check_dtype=False)


def test_csi_is_zero_on_the_reference_and_flags_the_shifted_features():
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((5000, 4))
    reference[:, 3] = rng.integers(0, 3, 5000)  # a discrete feature: fewer than ten bins
    edges, shares = characteristic_reference(reference)
    assert len(edges[3]) <= 3 and all(abs(s.sum() - 1) < 1e-12 for s in shares)
    np.testing.assert_array_equal(characteristic_stability(shares, characteristic_shares(reference, edges)), 0.0)
    new = rng.standard_normal((5000, 4))
    new[:, 3] = rng.integers(0, 3, 5000)
    new[:, 0] += 1.0  # shifted
    new[rng.random(5000) < 0.3, 1] = np.nan  # 30% now missing
    csi = characteristic_stability(shares, characteristic_shares(new, edges))
    assert csi[0] > 0.25 and csi[1] > 0.25 and csi[2] < 0.02 and csi[3] < 0.02


def test_evaluation_reports_csi_per_feature_and_keeps_it_through_save(taiwan, tmp_path):
    records, scorers = taiwan
    scorer = scorers["lightgbm"]
    test = records.take(slice(4000, 8000))
    stable = evaluate_scorer(scorer, test, speed=False)
    assert len(stable["csi"]) == len(scorer.pipeline_.feature_names_) and stable["metrics"]["csi_max"] < 0.1
    shifted = Records("taiwan", test.frame.assign(LIMIT_BAL=test.frame["LIMIT_BAL"] * 4), test.target)
    result = evaluate_scorer(scorer, shifted, speed=False)
    csi = result["csi"].set_index("feature")["csi"]
    assert result["metrics"]["csi_max"] > 0.25 and (csi[["limit", "log_limit", "util_mean6"]] > 0.25).all()
    assert (csi[["age", "bill_mean6", "status_last", "paid_last"]] < 0.1).all()  # they do not read the limit
    assert result["metrics"]["features_csi_over_0.25"] == (csi > 0.25).sum()
    reloaded = evaluate_scorer(load_model(scorer.save(tmp_path / "m")), shifted, speed=False)
    pd.testing.assert_frame_equal(reloaded["csi"], result["csi"], check_exact=True)


def test_one_pass_of_the_moe_and_the_ensemble_equals_predict_and_contributions(taiwan):
    """`score` with reasons takes both from one pass (the MoE's forward rides on its integrated
    gradients); alone (the small-batch expert path) or in a batch, it is what the two calls give."""
    records, scorers = taiwan
    moe = scorers["moe"]
    valid = records.frame.iloc[5000:6000]
    ensemble = EnsembleModel.from_fitted([scorers[n].model_ for n in ("lightgbm", "moe", "scorecard")],
                                         moe.pipeline_.transform(valid), records.target[5000:6000],
                                         feature_names=moe.pipeline_.feature_names_, dataset="taiwan")
    data = moe.features(records.frame.iloc[:300])
    for model in (moe.model_, ensemble):
        proba, contributions = model.predict_with_contributions(data)
        np.testing.assert_allclose(proba, model.predict_proba(data), rtol=1e-5)
        np.testing.assert_allclose(contributions, model.contributions(data), rtol=1e-4, atol=1e-6)
        for i in (0, 1, 150):
            one = FitData(data.X[i:i + 1])
            alone_proba, alone_contributions = model.predict_with_contributions(one)
            np.testing.assert_allclose(alone_proba, proba[i:i + 1], rtol=1e-5)
            np.testing.assert_allclose(alone_contributions, contributions[i:i + 1], rtol=1e-4, atol=1e-6)
    assert np.abs(contributions).max() > 1e-3  # attributions are not all zero
