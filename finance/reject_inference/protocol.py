"""The reject-inference protocol on fully labelled data (Kozodoi et al. 2019).

1. Split the labelled applicants into history, applications and holdout (seeded, stratified).
2. Replay an acceptance policy: an earlier scorecard (a binned logistic regression) is fitted on
   the history and accepts the best `acceptance_rate` of the applications.
3. Hide the outcomes of the rejected applications: that is what the bank saw. Any further
   unlabelled applicants (Give Me Some Credit's cs-test) join the unlabelled pool.
4. Train each method on that view; train the upper bound with every application's outcome.
5. Evaluate all of them on the holdout, the whole through-the-door population: AUC, and the
   kickout measure against the accepted-only model at the policy's acceptance rate.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from finance.reject_inference.methods import UNLABELLED, clone_estimator, positive_proba, stack


@dataclass
class ProtocolConfig:
    acceptance_rate: float = 0.6  # the best 60% accepted: a common approval rate for unsecured credit
    history_share: float = 0.2  # earlier applicants the old scorecard was built on
    holdout_share: float = 0.3  # through-the-door applicants kept, with all outcomes, for evaluation
    seed: int = 0

    def __post_init__(self) -> None:
        assert 0 < self.acceptance_rate < 1, f"acceptance_rate must lie in (0, 1), got {self.acceptance_rate}"
        assert 0 < self.history_share and 0 < self.holdout_share and self.history_share + self.holdout_share < 1, \
            "history_share and holdout_share must be positive and leave room for the applications"


def policy_scorecard(seed: int = 0) -> Any:
    """The earlier scorecard replayed as the acceptance policy: quintile bins of each feature
    (missing values get their own indicator) into an L2 logistic regression."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import KBinsDiscretizer

    return make_pipeline(
        SimpleImputer(strategy="median", add_indicator=True),
        KBinsDiscretizer(n_bins=5, encode="onehot", strategy="quantile", quantile_method="averaged_inverted_cdf"),
        LogisticRegression(C=1.0, max_iter=1000, random_state=seed),
    )


@dataclass
class RejectInferenceSample:
    """What the protocol hands to the methods. Arrays are aligned with their frames' rows."""

    X_apply: pd.DataFrame  # the applications the policy decided on
    y_apply: np.ndarray  # their true outcomes: only the upper bound may read the rejected ones
    accepted: np.ndarray  # (n_apply,) bool, the policy's decisions
    X_holdout: pd.DataFrame  # the whole through-the-door population, for evaluation
    y_holdout: np.ndarray
    X_unlabelled_extra: pd.DataFrame | None  # applicants with no outcome at all (e.g. cs-test)
    policy: Any  # the fitted earlier scorecard

    def bank_view(self) -> tuple[pd.DataFrame, np.ndarray]:
        """(X, y) as the bank saw it: the rejects' outcomes replaced by -1, extra unlabelled appended."""
        y = np.where(self.accepted, self.y_apply, UNLABELLED).astype("int64")
        if self.X_unlabelled_extra is None or not len(self.X_unlabelled_extra):
            return self.X_apply.reset_index(drop=True), y
        X = stack([self.X_apply.reset_index(drop=True), self.X_unlabelled_extra.reset_index(drop=True)])
        return X, np.r_[y, np.full(len(self.X_unlabelled_extra), UNLABELLED, dtype="int64")]


def replay_policy(X: pd.DataFrame, y: Any, config: ProtocolConfig,
                  X_unlabelled_extra: pd.DataFrame | None = None) -> RejectInferenceSample:
    """Steps 1-3 of the protocol on a labelled population (X, y)."""
    y = np.asarray(y, dtype="int64")
    rest_X, holdout_X, rest_y, holdout_y = train_test_split(
        X, y, test_size=config.holdout_share, stratify=y, random_state=config.seed)
    history_of_rest = config.history_share / (1 - config.holdout_share)
    apply_X, history_X, apply_y, history_y = train_test_split(
        rest_X, rest_y, test_size=history_of_rest, stratify=rest_y, random_state=config.seed + 1)
    policy = policy_scorecard(config.seed)
    with warnings.catch_warnings():  # tied quantiles of count features merge bins; that is intended
        warnings.simplefilter("ignore", UserWarning)
        policy.fit(history_X, history_y)
        risk = positive_proba(policy, apply_X)
    accepted = accept_lowest_risk(risk, config.acceptance_rate)
    return RejectInferenceSample(apply_X.reset_index(drop=True), apply_y, accepted,
                                 holdout_X.reset_index(drop=True), holdout_y, X_unlabelled_extra, policy)


def accept_lowest_risk(pd_: np.ndarray, rate: float) -> np.ndarray:
    """(n,) bool: the `rate` share of applicants with the lowest PD (ties in row order)."""
    accepted = np.zeros(len(pd_), dtype=bool)
    accepted[np.argsort(pd_, kind="stable")[: int(round(rate * len(pd_)))]] = True
    return accepted


def kickout(y: np.ndarray, pd_baseline: np.ndarray, pd_new: np.ndarray, acceptance_rate: float) -> float:
    """Kozodoi et al. (2019)'s kickout: how a new model changes the accepted set of a baseline.

    Both models accept the `acceptance_rate` lowest-PD applicants. Of those the baseline accepts and
    the new model rejects (kicked out), bads are a gain and goods a loss:
        kickout = (K_B / p_B - K_G / (1 - p_B)) / (S_B / p_B)
    K_B, K_G: bad and good applicants kicked out; p_B: bad share of the sample; S_B: bads the
    baseline accepts. 1 is ideal (every accepted bad kicked out, no good), 0 no change, < 0 worse.
    """
    y = np.asarray(y).astype(bool)
    base, new = accept_lowest_risk(pd_baseline, acceptance_rate), accept_lowest_risk(pd_new, acceptance_rate)
    kicked = base & ~new
    p_bad = y.mean()
    selected_bad = (base & y).sum()
    if selected_bad == 0:
        return float("nan")
    return float(((kicked & y).sum() / p_bad - (kicked & ~y).sum() / (1 - p_bad)) / (selected_bad / p_bad))


@dataclass
class MethodResult:
    method: str
    auc: float  # on the holdout, the whole population
    kickout: float  # against accepted-only at the policy's acceptance rate
    gap_closed: float  # (auc - accepted-only) / (upper bound - accepted-only)
    train_rows: int
    seconds: float


def run_protocol(sample: RejectInferenceSample, methods: dict[str, Any], estimator: Any,
                 acceptance_rate: float, progress: Any = None) -> list[MethodResult]:
    """Fit every method on the bank's view and the upper bound on all labels; score on the holdout.

    `methods` maps a name to an unfitted RejectInferenceClassifier; it must include "accepted-only".
    """
    from sklearn.metrics import roc_auc_score

    assert "accepted-only" in methods, "the table is relative to the accepted-only baseline"
    X_bank, y_bank = sample.bank_view()
    scores: dict[str, tuple[np.ndarray, int, float]] = {}
    for name, method in methods.items():
        started = time.perf_counter()
        method.fit(X_bank, y_bank)
        scores[name] = (positive_proba(method, sample.X_holdout), method.n_train_rows_, time.perf_counter() - started)
        if progress is not None:
            progress(name)
    started = time.perf_counter()
    upper = clone_estimator(estimator).fit(sample.X_apply, sample.y_apply)
    scores["upper-bound"] = (positive_proba(upper, sample.X_holdout), len(sample.y_apply),
                             time.perf_counter() - started)
    baseline_pd = scores["accepted-only"][0]
    auc = {name: float(roc_auc_score(sample.y_holdout, s[0])) for name, s in scores.items()}
    gap = auc["upper-bound"] - auc["accepted-only"]
    return [MethodResult(name, auc[name], kickout(sample.y_holdout, baseline_pd, pd_, acceptance_rate),
                         (auc[name] - auc["accepted-only"]) / gap if gap > 0 else float("nan"), rows, seconds)
            for name, (pd_, rows, seconds) in scores.items()]
