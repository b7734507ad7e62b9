import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from finance.data import load_taiwan
from finance.reject_inference.experiment import fields, make_estimator
from finance.reject_inference.methods import (
    METHODS,
    AcceptedOnly,
    BaggedFuzzyAugmentation,
    FuzzyAugmentation,
    IteratedFuzzyAugmentation,
    SelfTraining,
    UpliftedFuzzyAugmentation,
    balanced_probability,
    make_method,
    positive_proba,
)
from finance.reject_inference.protocol import ProtocolConfig, replay_policy


@pytest.fixture(scope="module")
def sample(data_root):
    records = load_taiwan(data_root / "taiwan_credit_default")
    X = fields(records)
    return replay_policy(X.iloc[:4000].reset_index(drop=True), records.target[:4000], ProtocolConfig(seed=0))


def small_lightgbm():
    from lightgbm import LGBMClassifier

    return LGBMClassifier(n_estimators=60, learning_rate=0.1, num_leaves=7, min_child_samples=30,
                          n_jobs=1, verbose=-1, random_state=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_runs_on_a_small_real_sample(sample, name):
    X_bank, y_bank = sample.bank_view()
    method = make_method(name, estimator=small_lightgbm()).fit(X_bank, y_bank)
    proba = method.predict_proba(sample.X_holdout)
    assert proba.shape == (len(sample.y_holdout), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert roc_auc_score(sample.y_holdout, proba[:, 1]) > 0.6
    n_lab, n_unl = method.n_labelled_, method.n_unlabelled_
    assert (n_lab, n_unl) == (sample.accepted.sum(), (~sample.accepted).sum())
    expected_rows = {"accepted-only": n_lab, "reweighting": n_lab, "hard-cutoff": n_lab + n_unl,
                     "parcelling": n_lab + n_unl, "fuzzy": n_lab + 2 * n_unl, "fuzzy-bagged": n_lab + 2 * n_unl,
                     "fuzzy-em": n_lab + 2 * n_unl, "fuzzy-uplift": n_lab + 2 * n_unl}
    if name in expected_rows:
        assert method.n_train_rows_ == expected_rows[name]
    else:
        assert n_lab <= method.n_train_rows_ <= n_lab + n_unl


def test_methods_wrap_an_sklearn_pipeline_with_weights(sample):
    X_bank, y_bank = sample.bank_view()
    for name in ("fuzzy", "reweighting"):
        method = make_method(name, estimator=make_estimator("logistic")).fit(X_bank, y_bank)
        assert roc_auc_score(sample.y_holdout, method.predict_proba(sample.X_holdout)[:, 1]) > 0.55


def test_fuzzy_augmentation_leaves_a_logistic_regression_unchanged(sample):
    X_bank, y_bank = sample.bank_view()
    Z = (X_bank - X_bank.mean()) / X_bank.std()  # fixed scaling, so only the fit itself could move
    model = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10)
    plain = AcceptedOnly(estimator=model).fit(Z, y_bank)
    fuzzy = FuzzyAugmentation(estimator=model).fit(Z, y_bank)
    np.testing.assert_allclose(fuzzy.estimator_.coef_, plain.estimator_.coef_, atol=2e-3)


def test_self_training_stops_at_its_threshold(sample):
    X_bank, y_bank = sample.bank_view()
    never = SelfTraining(estimator=small_lightgbm(), threshold=0.999999).fit(X_bank, y_bank)
    assert never.rounds_ == [] and never.stopped_because_ == "no reject passes the threshold"
    assert len(never.pseudo_index_) == 0

    method = SelfTraining(estimator=small_lightgbm(), threshold=0.9, max_rounds=50,
                          max_share_per_round=0.05).fit(X_bank, y_bank)
    assert method.stopped_because_ in ("no reject passes the threshold", "pool empty")
    cap = int(0.05 * method.n_labelled_)
    assert all(r["added_bad"] <= cap and r["added_good"] <= cap for r in method.rounds_)
    assert len(method.pseudo_index_) == sum(r["added_bad"] + r["added_good"] for r in method.rounds_) > 0
    # The model it stopped with finds no remaining reject beyond the threshold.
    unlabelled = X_bank[y_bank == -1].reset_index(drop=True)
    remaining = np.setdiff1d(np.arange(len(unlabelled)), method.pseudo_index_)
    prior = y_bank[y_bank != -1].mean()
    p = balanced_probability(method.predict_proba(unlabelled.iloc[remaining])[:, 1], prior)
    assert ((p < 0.9) & (p > 0.1)).all()


def test_unknown_labels_are_rejected_with_the_row():
    with pytest.raises(ValueError, match="row 2"):
        AcceptedOnly(estimator=LogisticRegression()).fit(np.zeros((3, 1)), [0, 1, 2])


def test_bagged_fuzzy_averages_resampled_labellers(sample):
    X_bank, y_bank = sample.bank_view()
    n_unl = int((y_bank == -1).sum())
    one = BaggedFuzzyAugmentation(estimator=small_lightgbm(), n_labellers=3, seed=1).fit(X_bank, y_bank)
    again = BaggedFuzzyAugmentation(estimator=small_lightgbm(), n_labellers=3, seed=1).fit(X_bank, y_bank)
    other = BaggedFuzzyAugmentation(estimator=small_lightgbm(), n_labellers=3, seed=2).fit(X_bank, y_bank)
    assert one.labeller_pd_.shape == (n_unl,) and ((one.labeller_pd_ > 0) & (one.labeller_pd_ < 1)).all()
    np.testing.assert_array_equal(one.labeller_pd_, again.labeller_pd_)  # seeded resamples
    assert not np.array_equal(one.labeller_pd_, other.labeller_pd_) and one.labeller_spread_ > 0
    # The rejects' soft labels are the averaged PD: bad rows weighted p, good rows 1 - p.
    single = FuzzyAugmentation(estimator=small_lightgbm()).fit(X_bank, y_bank)
    base = positive_proba(single.base_estimator_, X_bank[y_bank == -1])
    assert np.corrcoef(base, one.labeller_pd_)[0, 1] > 0.6


def test_iterated_fuzzy_starts_as_fuzzy_and_relabels_each_round(sample):
    X_bank, y_bank = sample.bank_view()
    fuzzy = FuzzyAugmentation(estimator=small_lightgbm()).fit(X_bank, y_bank)
    one = IteratedFuzzyAugmentation(estimator=small_lightgbm(), n_rounds=1).fit(X_bank, y_bank)
    np.testing.assert_allclose(one.predict_proba(sample.X_holdout), fuzzy.predict_proba(sample.X_holdout))
    assert one.rounds_ == []
    three = IteratedFuzzyAugmentation(estimator=small_lightgbm(), n_rounds=3).fit(X_bank, y_bank)
    assert [r["round"] for r in three.rounds_] == [1, 2]
    assert all(r["mean_change"] > 0 for r in three.rounds_)  # the soft labels moved
    assert not np.allclose(three.predict_proba(sample.X_holdout), fuzzy.predict_proba(sample.X_holdout))


def test_uplifted_fuzzy_raises_the_bad_odds_outside_the_accepted_region(sample):
    # The pool: the rejects plus the through-the-door holdout (unlabelled, as GMSC's cs-test is).
    X_bank, y_bank = sample.bank_view()
    X = pd.concat([X_bank, sample.X_holdout], ignore_index=True)
    y = np.r_[y_bank, np.full(len(sample.X_holdout), -1)]
    method = UpliftedFuzzyAugmentation(estimator=small_lightgbm(), bad_odds_factor=2.0).fit(X, y)
    p, q, r = method.labeller_pd_, method.uplifted_pd_, method.outside_
    assert p.shape == q.shape == r.shape == ((y == -1).sum(),) and ((r >= 0) & (r <= 1)).all()
    np.testing.assert_allclose(q / (1 - q), p / (1 - p) * 2.0 ** r, rtol=1e-9)
    # The acceptance model tells the policy's rejects from the applicants it would have accepted.
    policy_pd = positive_proba(sample.policy, sample.X_holdout)
    n_rejects = int((~sample.accepted).sum())
    in_holdout = r[n_rejects:]  # the unlabelled rows in order: the rejects, then the holdout
    would_accept = policy_pd <= np.sort(positive_proba(sample.policy, sample.X_apply))[sample.accepted.sum() - 1]
    assert in_holdout[~would_accept].mean() > in_holdout[would_accept].mean() + 0.3
    assert r[:n_rejects].mean() > 0.5  # the applications' rejects lie outside
    # Factor 1 is plain fuzzy augmentation; a factor > 1 raises the final model's PD for the rejects.
    plain = FuzzyAugmentation(estimator=small_lightgbm()).fit(X, y)
    one = UpliftedFuzzyAugmentation(estimator=small_lightgbm(), bad_odds_factor=1.0).fit(X, y)
    np.testing.assert_allclose(one.predict_proba(sample.X_holdout), plain.predict_proba(sample.X_holdout))
    rejects = X_bank[y_bank == -1]
    assert method.predict_proba(rejects)[:, 1].mean() > 1.2 * plain.predict_proba(rejects)[:, 1].mean()
