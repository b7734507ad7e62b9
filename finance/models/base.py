"""The interface every credit model implements, and the registry that names them."""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

# name -> "module:Class" for the built-in models, imported on first use so that a CLI call that
# needs LightGBM does not pay for torch. Registered classes are kept in a per-process table.
_BUILTIN = {
    "scorecard": "finance.models.scorecard:ScorecardModel",
    "lightgbm": "finance.models.gbdt:LightGBMModel",
    "moe": "finance.models.moe:MoEModel",
    "ensemble": "finance.models.ensemble:EnsembleModel",
    "sequence": "finance.sequence.credit_model:SequenceModel",
    "sequence-ensemble": "finance.sequence.credit_model:SequenceEnsembleModel",
}
_REGISTERED: dict[str, type[CreditModel]] = {}


def register_model(name: str):
    """Class decorator: make a CreditModel subclass available as `name`."""

    def wrap(cls: type[CreditModel]) -> type[CreditModel]:
        assert issubclass(cls, CreditModel), f"{cls} must subclass CreditModel"
        _REGISTERED[name] = cls
        cls.name = name
        return cls

    return wrap


def _import_plugins() -> None:
    for module in filter(None, os.environ.get("MOEWORKS_FINANCE_MODELS", "").split(",")):
        importlib.import_module(module.strip())


def available_models() -> list[str]:
    _import_plugins()
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def model_class(name: str) -> type[CreditModel]:
    if name not in _REGISTERED:
        _import_plugins()
    if name not in _REGISTERED and name in _BUILTIN:
        module, _, _cls = _BUILTIN[name].partition(":")
        importlib.import_module(module)  # registers itself
    if name not in _REGISTERED:
        from finance.errors import CreditDataError

        raise CreditDataError(f"unknown model {name!r}; available: {', '.join(available_models())}", field="model")
    return _REGISTERED[name]


def build_model(name: str, *, feature_names: list[str], dataset: str, seed: int = 0,
                progress: bool = False, config: Any = None) -> CreditModel:
    return model_class(name)(feature_names=feature_names, dataset=dataset, seed=seed, progress=progress,
                             config=config)


@dataclass
class FitData:
    """What a model trains or scores on.

    X: (n, n_features) float32 features from the FeaturePipeline (NaN = missing).
    y: (n,) 0/1 labels, or None when scoring.
    records: the raw records X was built from, for models that read them (sequence models).
    sample_weight: (n,) weights, e.g. from reject inference; None = all 1.
    """

    X: np.ndarray
    y: np.ndarray | None = None
    records: pd.DataFrame | None = None
    sample_weight: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.X)

    def take(self, rows: np.ndarray) -> FitData:
        """The subset at positions `rows` (labels, records and weights alike)."""
        return FitData(self.X[rows], None if self.y is None else self.y[rows],
                       None if self.records is None else self.records.iloc[rows],
                       None if self.sample_weight is None else self.sample_weight[rows])


class CreditModel(ABC):
    """A probability-of-default model over the feature matrix (scikit-learn conventions).

    Constructor (keyword-only, no work): feature_names, dataset, seed, progress, config (an instance
    of `config_class`, defaults when None).
    fit(train, valid) -> self; `valid` is for early stopping or weighting, never for the final score.
    predict_proba(data) -> (n, 2): column 1 is the probability of default.
    contributions(data) -> (n, n_features): each feature's push on the log-odds of default
        relative to a low-risk reference (> 0 raises risk); reason codes rank these.
    predict_with_contributions(data) -> both of the above; a model that gets both from one pass
        (the MoE network's integrated gradients) overrides it.
    save(directory) / load(directory, ...) round-trip to identical scores.
    """

    name: ClassVar[str] = "base"
    needs_records: ClassVar[bool] = False  # True: fit/predict need FitData.records

    config_class: ClassVar[type | None] = None  # the model's @dataclass of hyper-parameters

    def __init__(self, *, feature_names: list[str], dataset: str, seed: int = 0, progress: bool = False,
                 config: Any = None) -> None:
        self.config = config if config is not None else (self.config_class() if self.config_class else None)
        self.feature_names = list(feature_names)
        self.dataset = dataset
        self.seed = seed
        self.progress = progress

    @abstractmethod
    def fit(self, train: FitData, valid: FitData) -> CreditModel: ...

    @abstractmethod
    def predict_proba(self, data: FitData) -> np.ndarray: ...

    @abstractmethod
    def contributions(self, data: FitData) -> np.ndarray: ...

    @abstractmethod
    def save(self, directory: Path) -> None: ...

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, *, feature_names: list[str], dataset: str) -> CreditModel: ...

    def predict_with_contributions(self, data: FitData) -> tuple[np.ndarray, np.ndarray]:
        """(predict_proba(data) (n, 2), contributions(data) (n, n_features)) together."""
        return self.predict_proba(data), self.contributions(data)

    def summary(self) -> dict[str, Any]:
        """A few facts about the fitted model for the report (trees, selected features, ...)."""
        return {}

    def predict_pd(self, data: FitData) -> np.ndarray:
        return self.predict_proba(data)[:, 1]


def logistic_proba(X: np.ndarray, logistic: Any) -> np.ndarray:
    """(n, 2) probabilities of a fitted binary LogisticRegression on X (n, d), row by row.

    sklearn's own predict_proba goes through a BLAS product whose rounding can depend on the
    number of rows; a sum along each row does not, so one application alone gets exactly the
    probability it gets in a batch. Agrees with sklearn to ~1e-16.
    """
    from scipy.special import expit

    pd_ = expit((X * logistic.coef_[0]).sum(axis=1) + logistic.intercept_[0])
    return np.column_stack([1 - pd_, pd_])


def as_fit_data(data: FitData | np.ndarray) -> FitData:
    return data if isinstance(data, FitData) else FitData(np.asarray(data, dtype=np.float32))
