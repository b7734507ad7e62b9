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
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from finance.models.base import CreditModel, FitData, build_model, logistic_proba, model_class, register_model


@dataclass
class EnsembleConfig:
    members: list[str] = field(default_factory=lambda: ["lightgbm", "moe", "scorecard"])  # trees, experts, WoE
    cross_fit: bool = True  # blend on cross-fitted validation predictions (each member trained 3 times)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _cross_fitted_logits(members: list[CreditModel], train: FitData, valid: FitData) -> np.ndarray:
    """(n_valid, members) log-odds where each row comes from a copy of the member (same class,
    config and seed) trained on `train` and early-stopped on the other half of `valid`."""
    halves = list(StratifiedKFold(2, shuffle=True, random_state=0).split(valid.X, valid.y))
    out = np.zeros((len(valid), len(members)))
    for j, member in enumerate(members):
        for stop_rows, blend_rows in halves:
            refit = build_model(member.name, feature_names=member.feature_names, dataset=member.dataset,
                               seed=member.seed, progress=member.progress, config=member.config)
            refit.fit(train, valid.take(stop_rows))
            out[blend_rows, j] = _logit(refit.predict_proba(valid.take(blend_rows))[:, 1])
    return out


@register_model("ensemble")
class EnsembleModel(CreditModel):
    config_class = EnsembleConfig

    @property
    def needs_records(self) -> bool:  # type: ignore[override]
        return any(model_class(m).needs_records for m in self.config.members)

    def fit(self, train: FitData, valid: FitData) -> EnsembleModel:
        members = [build_model(name, feature_names=self.feature_names, dataset=self.dataset, seed=self.seed,
                               progress=self.progress).fit(train, valid) for name in self.config.members]
        fitted = self.from_fitted(members, valid, train=train if self.config.cross_fit else None,
                                  feature_names=self.feature_names, dataset=self.dataset)
        self.members_, self.blend_ = fitted.members_, fitted.blend_
        return self

    @classmethod
    def from_fitted(cls, members: list[CreditModel], valid: FitData, *, feature_names: list[str],
                    dataset: str, train: FitData | None = None) -> EnsembleModel:
        """Blend models that are already fitted (on the same split), e.g. in a benchmark.

        train: the members' training part; given, the blend is fitted on cross-fitted validation
        predictions (`_cross_fitted_logits`), else on the members' own validation predictions.
        """
        model = cls(feature_names=feature_names, dataset=dataset,
                    config=EnsembleConfig([m.name for m in members], cross_fit=train is not None))
        model.members_ = list(members)
        logits = model._member_logits(valid) if train is None else _cross_fitted_logits(members, train, valid)
        model.blend_ = LogisticRegression(C=100.0, max_iter=1000).fit(logits, valid.y,
                                                                     sample_weight=valid.sample_weight)
        return model

    def _member_logits(self, data: FitData) -> np.ndarray:
        return np.column_stack([_logit(m.predict_proba(data)[:, 1]) for m in self.members_])  # (n, members)

    def predict_proba(self, data: FitData) -> np.ndarray:
        return logistic_proba(self._member_logits(data), self.blend_)

    def contributions(self, data: FitData) -> np.ndarray:
        return self._blend_contributions([m.contributions(data) for m in self.members_])

    def predict_with_contributions(self, data: FitData) -> tuple[np.ndarray, np.ndarray]:
        """Each member's own fused pass (the MoE network runs once, not once per question)."""
        parts = [m.predict_with_contributions(data) for m in self.members_]
        proba = logistic_proba(np.column_stack([_logit(p[:, 1]) for p, _ in parts]), self.blend_)
        return proba, self._blend_contributions([c for _, c in parts])

    def _blend_contributions(self, contributions: list[np.ndarray]) -> np.ndarray:
        return sum(w * c for w, c in zip(self.blend_.coef_[0], contributions, strict=True))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for i, member in enumerate(self.members_):
            member.save(directory / f"member{i}_{member.name}")
        (directory / "ensemble.json").write_text(json.dumps({
            "config": asdict(self.config), "coef": self.blend_.coef_[0].tolist(),
            "intercept": float(self.blend_.intercept_[0])}))

    @classmethod
    def load(cls, directory: Path, *, feature_names: list[str], dataset: str) -> EnsembleModel:
        meta = json.loads((directory / "ensemble.json").read_text())
        model = cls(feature_names=feature_names, dataset=dataset, config=EnsembleConfig(**meta["config"]))
        model.members_ = [model_class(name).load(directory / f"member{i}_{name}", feature_names=feature_names,
                                                 dataset=dataset) for i, name in enumerate(model.config.members)]
        blend = LogisticRegression()
        blend.classes_ = np.array([0, 1])
        blend.coef_ = np.asarray([meta["coef"]])
        blend.intercept_ = np.asarray([meta["intercept"]])
        model.blend_ = blend
        return model

    def summary(self) -> dict[str, Any]:
        return {"members": self.config.members, "weights": [round(float(w), 3) for w in self.blend_.coef_[0]]}
