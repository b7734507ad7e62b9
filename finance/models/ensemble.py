"""An ensemble of registered models: their log-odds blended by a logistic regression.

The blend weights (three or so numbers) are fitted on the validation split, on cross-fitted
predictions: each member is trained twice more, early-stopped on one half of the validation split
and predicting the other, so that no weight is fitted on predictions whose epoch or tree count was
chosen on those same rows (on Taiwan's 3,840 validation rows that choice had made the MoE look
better than it is). The members kept are trained as they would be alone. Contributions are the members'
contributions weighted the same way, so reason codes still add up in log-odds. A subclass with
other `members` (e.g. a sequence model) needs no other change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from finance.models.base import (
    CreditModel,
    FitData,
    build_model,
    logistic_proba,
    model_class,
    register_model,
    take_rows,
)


@dataclass
class EnsembleConfig:
    members: list[str] = field(default_factory=lambda: ["lightgbm", "moe", "scorecard"])  # trees, experts, WoE
    cross_fit: bool = True  # blend on cross-fitted validation predictions (each member trained 3 times)

    def __post_init__(self) -> None:
        if not (isinstance(self.members, list) and self.members and all(isinstance(m, str) for m in self.members)):
            raise ValueError(f"EnsembleConfig: members must be a non-empty list of model names, got {self.members!r}")
        if not isinstance(self.cross_fit, bool):
            raise ValueError(f"EnsembleConfig: cross_fit must be true or false, got {self.cross_fit!r}")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _cross_fitted_logits(members: list[CreditModel], X: FitData | np.ndarray, y: np.ndarray,
                         sample_weight: np.ndarray | None, X_valid: FitData | np.ndarray,
                         y_valid: np.ndarray) -> np.ndarray:
    """(n_valid, members) log-odds where each row comes from a clone of the member (same class and
    parameters) trained on X, y and early-stopped on the other half of the validation rows."""
    halves = list(StratifiedKFold(2, shuffle=True, random_state=0).split(np.zeros(len(y_valid)), y_valid))
    out = np.zeros((len(y_valid), len(members)))
    for j, member in enumerate(members):
        for stop_rows, blend_rows in halves:
            refit = clone(member).fit(X, y, sample_weight=sample_weight,
                                      eval_set=[(take_rows(X_valid, stop_rows), y_valid[stop_rows])])
            out[blend_rows, j] = _logit(refit.predict_proba(take_rows(X_valid, blend_rows))[:, 1])
    return out


@register_model("ensemble")
class EnsembleModel(CreditModel):
    """Learned: members_ (the fitted members), blend_ (the logistic regression over their log-odds)."""

    config_class = EnsembleConfig

    @property
    def needs_records(self) -> bool:  # type: ignore[override]
        members = (self.config if self.config is not None else self.config_class()).members
        return any(model_class(m).needs_records for m in members)

    def _fit(self, X: FitData, y: np.ndarray, sample_weight: np.ndarray | None, X_valid: FitData | None,
             y_valid: np.ndarray | None) -> None:
        members = [build_model(name, feature_names=self.features_, dataset=self.dataset, seed=self.seed,
                               progress=self.progress).fit(X, y, sample_weight=sample_weight,
                                                           eval_set=[(X_valid, y_valid)])
                   for name in self.config_.members]
        self.members_ = members
        logits = (_cross_fitted_logits(members, X, y, sample_weight, X_valid, y_valid) if self.config_.cross_fit
                  else self._member_logits(X_valid))
        self.blend_ = LogisticRegression(C=100.0, max_iter=1000).fit(logits, y_valid)

    @classmethod
    def from_fitted(cls, members: list[CreditModel], X_valid: FitData | np.ndarray, y_valid: np.ndarray, *,
                    feature_names: list[str], dataset: str, X_train: FitData | np.ndarray | None = None,
                    y_train: np.ndarray | None = None) -> EnsembleModel:
        """Blend models that are already fitted (on the same split), e.g. in a benchmark.

        X_train, y_train: the members' training rows; given, the blend is fitted on cross-fitted
        validation predictions (`_cross_fitted_logits`), else on the members' own validation predictions.
        """
        cross_fit = X_train is not None
        model = cls._restored(config=EnsembleConfig([m.name for m in members], cross_fit=cross_fit),
                              feature_names=feature_names, dataset=dataset)
        model.members_ = list(members)
        y_valid = np.asarray(y_valid)
        logits = (_cross_fitted_logits(members, X_train, np.asarray(y_train), None, X_valid, y_valid) if cross_fit
                  else model._member_logits(X_valid))
        model.blend_ = LogisticRegression(C=100.0, max_iter=1000).fit(logits, y_valid)
        return model

    def _member_logits(self, X: FitData | np.ndarray) -> np.ndarray:
        return np.column_stack([_logit(m.predict_proba(X)[:, 1]) for m in self.members_])  # (n, members)

    def predict_proba(self, X: FitData | np.ndarray) -> np.ndarray:
        return logistic_proba(self._member_logits(self._input(X)), self.blend_)

    def contributions(self, X: FitData | np.ndarray) -> np.ndarray:
        X = self._input(X)
        return self._blend_contributions([m.contributions(X) for m in self.members_])

    def predict_with_contributions(self, X: FitData | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each member's own fused pass (the MoE network runs once, not once per question)."""
        X = self._input(X)
        parts = [m.predict_with_contributions(X) for m in self.members_]
        proba = logistic_proba(np.column_stack([_logit(p[:, 1]) for p, _ in parts]), self.blend_)
        return proba, self._blend_contributions([c for _, c in parts])

    def _blend_contributions(self, contributions: list[np.ndarray]) -> np.ndarray:
        return sum(w * c for w, c in zip(self.blend_.coef_[0], contributions, strict=True))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for i, member in enumerate(self.members_):
            member.save(directory / f"member{i}_{member.name}")
        (directory / "ensemble.json").write_text(json.dumps({
            "config": asdict(self.config_), "coef": self.blend_.coef_[0].tolist(),
            "intercept": float(self.blend_.intercept_[0])}))

    @classmethod
    def load(cls, directory: Path, *, feature_names: list[str], dataset: str) -> EnsembleModel:
        meta = json.loads((directory / "ensemble.json").read_text())
        model = cls._restored(config=cls.config_class(**meta["config"]), feature_names=feature_names,
                              dataset=dataset)
        model.members_ = [model_class(name).load(directory / f"member{i}_{name}", feature_names=feature_names,
                                                 dataset=dataset) for i, name in enumerate(model.config_.members)]
        blend = LogisticRegression()
        blend.classes_ = np.array([0, 1])
        blend.coef_ = np.asarray([meta["coef"]])
        blend.intercept_ = np.asarray([meta["intercept"]])
        model.blend_ = blend
        return model

    def summary(self) -> dict[str, Any]:
        return {"members": self.config_.members, "weights": [round(float(w), 3) for w in self.blend_.coef_[0]]}
