"""The interface every credit model implements, and the registry that names them."""

from __future__ import annotations

import copy
import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_array, check_is_fitted, column_or_1d

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
VALIDATION_SHARE = 0.2  # held out of the training rows for early stopping when fit gets no eval_set


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


def build_model(name: str, **params: Any) -> CreditModel:
    """An unfitted model of the registered `name`; params are its constructor's (see CreditModel)."""
    return model_class(name)(**params)


@dataclass
class FitData:
    """What a model reads when it needs more than the feature matrix.

    X: (n, n_features) float32 features from the FeaturePipeline (NaN = missing).
    records: the raw records X was built from, for models that read them (sequence models).
    """

    X: np.ndarray
    records: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.X)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.X.shape

    def take(self, rows: np.ndarray) -> FitData:
        """The subset at positions `rows` (features and records alike)."""
        return FitData(self.X[rows], None if self.records is None else self.records.iloc[rows])


def take_rows(X: FitData | np.ndarray, rows: np.ndarray) -> FitData | np.ndarray:
    return X.take(rows) if isinstance(X, FitData) else X[rows]


class CreditModel(ClassifierMixin, BaseEstimator, ABC):
    """A probability-of-default model over the feature matrix: a scikit-learn binary classifier.

    Constructor (keyword-only, stores its parameters and does nothing else, so `sklearn.base.clone`
    and get_params/set_params work): config (an instance of `config_class`; None = its defaults),
    feature_names (the columns' names; None = x0, x1, ...), dataset (whose records, for the models
    that read them), seed, progress.

    X is an (n, F) float32 feature matrix (NaN = missing), or a `FitData` holding it with the raw
    records for models that read them (`needs_records`).
    fit(X, y, *, sample_weight=None, eval_set=None) -> self. eval_set: [(X_valid, y_valid)], the
        rows for early stopping or weighting, never for the final score; None: a stratified, seeded
        share of the training rows is held out (`VALIDATION_SHARE`) by the models that use one.
    predict_proba(X) -> (n, 2): column 1 is the probability of default (of `classes_[1]`).
    contributions(X) -> (n, F): each feature's push on the log-odds of default relative to a
        low-risk reference (> 0 raises risk); reason codes rank these.
    predict_with_contributions(X) -> both of the above; a model that gets both from one pass
        (the MoE network's integrated gradients) overrides it.
    save(directory) / load(directory, ...) round-trip to identical scores.
    Learned: config_ (the config used), features_ (names), n_features_in_, classes_, and each model's own.
    """

    name: ClassVar[str] = "base"
    needs_records: ClassVar[bool] = False  # True: fit/predict need a FitData with records
    uses_eval_set: ClassVar[bool] = True  # False: the model learns from the training rows alone
    config_class: ClassVar[type | None] = None  # the model's @dataclass of hyper-parameters

    def __init__(self, *, config: Any = None, feature_names: list[str] | None = None, dataset: str | None = None,
                 seed: int = 0, progress: bool = False) -> None:
        self.config = config
        self.feature_names = feature_names
        self.dataset = dataset
        self.seed = seed
        self.progress = progress

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # NaN = missing, every model handles it
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X: FitData | np.ndarray, y: Any, *, sample_weight: Any = None,
            eval_set: list[tuple[Any, Any]] | None = None) -> CreditModel:
        data = as_fit_data(X)
        if self.needs_records and data.records is None:
            raise ValueError(f"the {self.name} model reads the raw records: pass X as a FitData with records")
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        y = self._encode_labels(y, len(data), fitting=True)
        weight = None
        if sample_weight is not None:
            weight = _check_sample_weight(sample_weight, data.X, dtype=np.float64, ensure_non_negative=True)
            if not weight.any():
                raise ValueError("sample_weight is zero for every row: nothing to learn from")
            if len(np.unique(y[weight > 0])) < 2:
                raise ValueError("sample_weight leaves one class only (every row of the other class weighs 0)")
        self._start_fit(data.X.shape[1])
        if eval_set is not None:
            if len(eval_set) != 1 or len(eval_set[0]) != 2:
                raise ValueError("eval_set must be [(X_valid, y_valid)]: one validation set")
            valid = self._input(eval_set[0][0])
            y_valid = self._encode_labels(eval_set[0][1], len(valid), fitting=False)
        elif self.uses_eval_set:
            from sklearn.model_selection import train_test_split

            train_rows, valid_rows = train_test_split(np.arange(len(y)), test_size=VALIDATION_SHARE, stratify=y,
                                                      random_state=self.seed)
            train_rows, valid_rows = np.sort(train_rows), np.sort(valid_rows)
            valid, y_valid = data.take(valid_rows), y[valid_rows]
            data, y = data.take(train_rows), y[train_rows]
            weight = None if weight is None else weight[train_rows]
        else:
            valid, y_valid = None, None
        self._fit(data, y, weight, valid, y_valid)
        return self

    def _start_fit(self, n_features: int) -> None:
        """The learned attributes every model has, from the constructor's parameters and X's width."""
        config = self.config if self.config is not None else (self.config_class() if self.config_class else None)
        self.config_ = copy.deepcopy(config)
        names = list(self.feature_names) if self.feature_names is not None else [f"x{i}" for i in range(n_features)]
        if len(names) != n_features:
            raise ValueError(f"X has {n_features} features but feature_names names {len(names)}")
        self.features_ = names
        self.n_features_in_ = n_features

    def _encode_labels(self, y: Any, rows: int, *, fitting: bool) -> np.ndarray:
        """(rows,) int 0/1 with 1 = `classes_[1]` (the default); ValueError for anything but two classes."""
        y = column_or_1d(y, warn=True)
        if y.shape != (rows,):
            raise ValueError(f"y has {len(y)} labels for {rows} rows")
        if fitting:
            check_classification_targets(y)
            classes = np.unique(y)
            if len(classes) > 2:
                raise ValueError(f"Only binary classification is supported (good and default); y has {len(classes)} "
                                 "classes")
            if len(classes) < 2:
                raise ValueError(f"a credit model needs two classes (good and default); y has {len(classes)} class")
            self.classes_ = classes
        known = np.isin(y, self.classes_)
        if not known.all():
            raise ValueError(f"y holds label {y[~known][0]!r}, not one of the classes {self.classes_.tolist()}")
        return (y == self.classes_[1]).astype(np.int64)

    @classmethod
    def _restored(cls, *, config: Any, feature_names: list[str], dataset: str | None) -> CreditModel:
        """A model with the learned attributes every model has, for `load` to fill in the rest."""
        model = cls(config=config, feature_names=list(feature_names), dataset=dataset)
        model._start_fit(len(feature_names))
        model.classes_ = np.array([0, 1])
        return model

    @abstractmethod
    def _fit(self, X: FitData, y: np.ndarray, sample_weight: np.ndarray | None, X_valid: FitData | None,
             y_valid: np.ndarray | None) -> None:
        """Learn from X (n, F) and y (n,) 0/1; X_valid / y_valid are None when `uses_eval_set` is False."""

    @abstractmethod
    def predict_proba(self, X: FitData | np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def contributions(self, X: FitData | np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def save(self, directory: Path) -> None: ...

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, *, feature_names: list[str], dataset: str) -> CreditModel: ...

    def _input(self, X: FitData | np.ndarray) -> FitData:
        """X as a FitData for a fitted model: NotFittedError before fit, ValueError for the wrong width."""
        check_is_fitted(self, "features_")
        data = as_fit_data(X)
        if data.X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {data.X.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input")
        return data

    def predict(self, X: FitData | np.ndarray) -> np.ndarray:
        """(n,) the more probable class."""
        default = self.predict_proba(X)[:, 1] > 0.5  # first: an unfitted model raises NotFittedError here
        return self.classes_[default.astype(np.int64)]

    def predict_with_contributions(self, X: FitData | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predict_proba(X) (n, 2), contributions(X) (n, n_features)) together."""
        return self.predict_proba(X), self.contributions(X)

    def summary(self) -> dict[str, Any]:
        """A few facts about the fitted model for the report (trees, selected features, ...)."""
        return {}

    def predict_pd(self, X: FitData | np.ndarray) -> np.ndarray:
        return self.predict_proba(X)[:, 1]


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
    """X as a FitData of float32 features: a FitData as it is, else through sklearn's check_array
    (2-D, at least one row and one feature, no sparse or complex input; NaN = missing)."""
    if isinstance(data, FitData):
        return data
    return FitData(check_array(data, dtype=np.float32, ensure_all_finite="allow-nan"))
