"""Any registered credit model (feature pipeline + model, a `CreditScorer`) as the estimator a
reject-inference method wraps, and training a saved scorer with a reject-inference method."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from finance.reject_inference.methods import UNLABELLED, make_method


class CreditModelEstimator:
    """fit(records, y, sample_weight) / predict_proba(records) over a `CreditScorer`.

    Args:
        dataset: the records' dataset ("taiwan", "gmsc", "generated").
        model_name: a registered credit model ("lightgbm", "scorecard", "moe", "ensemble", "sequence", ...).
        valid_share: rows of each fit held out for early stopping and the cut-off.
        seed: split and model.
        policy: the scorer's ScoringPolicy (None: its default).
        exclude_protected: train without the features computed from protected attributes.
    Learned: scorer_ (the fitted CreditScorer, ready to save).
    """

    def __init__(self, *, dataset: str, model_name: str = "lightgbm", valid_share: float = 0.2, seed: int = 0,
                 policy: Any = None, exclude_protected: bool = False) -> None:
        self.dataset = dataset
        self.model_name = model_name
        self.valid_share = valid_share
        self.seed = seed
        self.policy = policy
        self.exclude_protected = exclude_protected

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        return {"dataset": self.dataset, "model_name": self.model_name, "valid_share": self.valid_share,
                "seed": self.seed, "policy": self.policy, "exclude_protected": self.exclude_protected}

    def set_params(self, **params: Any) -> CreditModelEstimator:
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def fit(self, X: pd.DataFrame, y: Any, sample_weight: Any = None) -> CreditModelEstimator:
        from sklearn.model_selection import train_test_split

        from finance.data import Records
        from finance.scorer import CreditScorer

        frame = X.reset_index(drop=True)
        y = np.asarray(y, dtype="int64")
        train_idx, valid_idx = train_test_split(np.arange(len(y)), test_size=self.valid_share, stratify=y,
                                                random_state=self.seed)
        weight = None if sample_weight is None else np.asarray(sample_weight, dtype="float64")[train_idx]
        records = Records(self.dataset, frame, y)
        train, valid = records.take(train_idx), records.take(valid_idx)
        self.scorer_ = CreditScorer(dataset=self.dataset, model_name=self.model_name, policy=self.policy,
                                    seed=self.seed, exclude_protected=self.exclude_protected).fit(
            train, valid, sample_weight=weight)
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = self.scorer_.predict_pd(X.reset_index(drop=True))
        return np.stack([1.0 - p, p], axis=1)


def train_with_reject_inference(labelled: Any, unlabelled: Any, *, model_name: str, method: str | None, seed: int = 0,
                                policy: Any = None, exclude_protected: bool = False) -> tuple[Any, Any]:
    """Train a credit scorer on accepted loans (`labelled` Records) plus unlabelled applicants
    (`unlabelled` Records: the rejects, or any applicants without outcome) with a reject-inference
    method. Returns (the fitted CreditScorer, the fitted method, for its learned attributes)."""
    from finance.errors import CreditDataError
    from finance.reject_inference.methods import METHODS

    if method not in METHODS:
        raise CreditDataError(f"unknown reject-inference method {method!r}; choose from {list(METHODS)}",
                              field="reject_inference")
    if unlabelled is None or not len(unlabelled.frame):
        raise CreditDataError("reject inference needs applicants without outcome (--unlabelled)", field="unlabelled")
    estimator = CreditModelEstimator(dataset=labelled.dataset, model_name=model_name, seed=seed, policy=policy,
                                     exclude_protected=exclude_protected)
    frame = pd.concat([labelled.frame, unlabelled.frame], ignore_index=True)
    y = np.r_[np.asarray(labelled.target, dtype="int64"), np.full(len(unlabelled.frame), UNLABELLED)]
    fitted = make_method(method, estimator=estimator).fit(frame, y)
    return fitted.estimator_.scorer_, fitted
