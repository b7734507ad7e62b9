import numpy as np
import pytest

from finance.data import load_gmsc, load_taiwan
from finance.reject_inference.experiment import fields
from finance.reject_inference.methods import UNLABELLED, positive_proba
from finance.reject_inference.protocol import ProtocolConfig, kickout, replay_policy


@pytest.fixture(scope="module")
def taiwan(data_root):
    records = load_taiwan(data_root / "taiwan_credit_default")
    return fields(records).iloc[:3000].reset_index(drop=True), records.target[:3000]


def test_protocol_hides_exactly_the_rejected_labels(taiwan):
    X, y = taiwan
    sample = replay_policy(X, y, ProtocolConfig(acceptance_rate=0.6, seed=3))
    X_bank, y_bank = sample.bank_view()
    n = len(sample.y_apply)
    assert sample.accepted.sum() == round(0.6 * n)
    hidden = y_bank == UNLABELLED
    np.testing.assert_array_equal(hidden, ~sample.accepted)
    np.testing.assert_array_equal(y_bank[~hidden], sample.y_apply[sample.accepted])
    # The policy accepted the lowest-risk applicants by its own (earlier) scorecard.
    risk = positive_proba(sample.policy, sample.X_apply)
    assert risk[sample.accepted].max() <= risk[~sample.accepted].min()
    # Applications, holdout and history are disjoint slices of the population.
    assert len(X_bank) == n and n + len(sample.y_holdout) < len(y)
    # Selection bias: the rejected applicants are riskier than the accepted ones.
    assert sample.y_apply[~sample.accepted].mean() > sample.y_apply[sample.accepted].mean()


def test_extra_unlabelled_applicants_join_the_pool(data_root):
    folder = data_root / "give_me_some_credit"
    records = load_gmsc(folder / "cs-training.csv.gz")
    X, y = fields(records), records.target
    extra = fields(load_gmsc(folder / "cs-test.csv.gz", require_target=False))
    assert len(extra) == 101_503
    sample = replay_policy(X.iloc[:4000], y[:4000], ProtocolConfig(seed=0), extra.iloc[:500])
    X_bank, y_bank = sample.bank_view()
    assert len(X_bank) == len(sample.y_apply) + 500
    assert (y_bank[-500:] == UNLABELLED).all()
    assert (y_bank[: len(sample.y_apply)] == UNLABELLED).sum() == (~sample.accepted).sum()


def test_kickout_matches_a_hand_count():
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 1, 0])  # p_bad = 0.3
    base = np.arange(10) / 10.0  # accepts rows 0..5 at 60%
    new = base.copy()
    new[[0, 2]] = 1.0  # kicks out row 0 (bad) and row 2 (good), kicks in rows 6 and 7
    # k_b = 1, k_g = 1, s_b = 2 (rows 0, 1)
    expected = (1 / 0.3 - 1 / 0.7) / (2 / 0.3)
    assert kickout(y, base, new, 0.6) == pytest.approx(expected)
    assert kickout(y, base, base, 0.6) == 0.0
    oracle = kickout(y, base, y.astype(float), 0.6)  # kicks out both accepted bads and only goods come in
    assert oracle == pytest.approx(1.0)


def test_experiment_passes_method_parameters(data_root):
    from finance.reject_inference.experiment import run_experiment

    # fuzzy-uplift with factor 1 is plain fuzzy augmentation; with its default (2) it is not.
    result = run_experiment("taiwan", data_root, estimator="logistic", methods=["fuzzy", "fuzzy-uplift"],
                            method_params={"fuzzy-uplift": {"bad_odds_factor": 1.0}}, max_rows=3000)
    auc = {row["method"]: row["auc"] for row in result["rows"]}
    assert auc["fuzzy-uplift"] == pytest.approx(auc["fuzzy"], abs=1e-12)
    assert result["method_params"] == {"fuzzy-uplift": {"bad_odds_factor": 1.0}}
    default = run_experiment("taiwan", data_root, estimator="logistic", methods=["fuzzy-uplift"], max_rows=3000)
    assert default["rows"][1]["method"] == "fuzzy-uplift" and default["rows"][1]["auc"] != auc["fuzzy"]


def test_summary_names_the_best_method_and_none_when_only_the_bounds_ran():
    from finance.reject_inference.experiment import summary_json

    def row(method, gap):
        return {"method": method, "auc": 0.7, "gap_closed": gap, "kickout": 0.0}

    result = {"dataset": "taiwan", "estimator": "lightgbm", "seeds": [0],
              "rows": [row("accepted-only", 0.0), row("upper-bound", 1.0)]}
    assert summary_json(result)["best_method"] is None
    result["rows"] += [row("fuzzy", 0.2), row("self-training", 0.5)]
    summary = summary_json(result)
    assert summary["best_method"] == "self-training" and summary["best_gap_closed"] == 0.5
