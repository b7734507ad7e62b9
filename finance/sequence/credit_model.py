"""The sequence models in the credit registry: `finance train --model sequence | sequence-ensemble`.

`sequence` is a CreditModel whose fit trains a SequenceClassifier on the raw records (X is a
`FitData` with records);
`sequence-ensemble` is the credit ensemble with LightGBM (on the 200+ pipeline features) and the
sequence model as members, blended on the validation split. Reason codes: the sequence model's
attributions per raw field (occlusion by default, or integrated gradients) are placed on the
pipeline feature that holds that field (e.g. PAY_0 -> status_sep), so the scorer's reason codes
read the same as for the other models.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finance.errors import CreditDataError
from finance.models.base import CreditModel, FitData, register_model
from finance.models.ensemble import EnsembleConfig, EnsembleModel
from finance.sequence.estimator import ATTRIBUTIONS, SequenceClassifier, SequenceTrainingConfig
from finance.sequence.model import SequenceTransformerConfig
from finance.sequence.tokens import TAIWAN_LAYOUT, MonthlyLayout


def _generated_layout() -> MonthlyLayout:
    """The generated population's records: `{field}_m1..m6`, m1 the latest month."""
    from finance.data import GENERATED
    from finance.generate import MONTHLY_FIELDS, MONTHS

    def oldest_first(name: str) -> tuple[str, ...]:
        return tuple(f"{name}_m{m}" for m in range(MONTHS, 0, -1))

    token_fields = ("days_past_due", "statement_balance", "payment_amount", "credit_limit")
    monthly = {f"{f}_m{m}" for f in MONTHLY_FIELDS for m in range(1, MONTHS + 1)}
    static = [s for s in GENERATED.fields if s.name not in monthly]
    return MonthlyLayout(
        status=oldest_first("days_past_due"), status_in_days=True, bill=oldest_first("statement_balance"),
        payment=oldest_first("payment_amount"), limit="credit_limit_m1",
        channels=tuple(oldest_first(f) for f in MONTHLY_FIELDS if f not in token_fields),
        static_numeric=tuple(s.name for s in static if s.kind != "category"),
        static_categorical=tuple(s.name for s in static if s.kind == "category"),
        static_log=("monthly_income", "requested_amount", "existing_debt", "geo_distance_km", "form_fill_seconds"))


LAYOUTS: dict[str, MonthlyLayout] = {"taiwan": TAIWAN_LAYOUT}
_MONTHS = ("sep", "aug", "jul", "jun", "may", "apr")  # Taiwan index 1..6, newest first
TAIWAN_FIELD_FEATURES = {
    **{p: f"status_{m}" for p, m in zip(("PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6"), _MONTHS, strict=True)},
    **{f"BILL_AMT{i}": f"bill_{m}" for i, m in enumerate(_MONTHS, start=1)},
    **{f"PAY_AMT{i}": f"paid_{m}" for i, m in enumerate(_MONTHS, start=1)},
    "LIMIT_BAL": "limit", "AGE": "age", "SEX": "female", "EDUCATION": "education", "MARRIAGE": "marriage",
}


@dataclass
class SequenceModelConfig:
    model: SequenceTransformerConfig = field(default_factory=SequenceTransformerConfig)
    training: SequenceTrainingConfig = field(default_factory=SequenceTrainingConfig)
    attribution: str = "occlusion"  # reason codes: exact, one batched pass; or "integrated-gradients"
    attribution_steps: int = 8  # integrated-gradient midpoints, when chosen

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = SequenceTransformerConfig(**self.model)
        if isinstance(self.training, dict):
            self.training = SequenceTrainingConfig(**self.training)
        if self.attribution not in ATTRIBUTIONS:
            raise ValueError(f"SequenceModelConfig: attribution must be one of {ATTRIBUTIONS}, "
                             f"got {self.attribution!r}")
        if not isinstance(self.attribution_steps, int) or self.attribution_steps < 1:
            raise ValueError(f"SequenceModelConfig: attribution_steps must be a positive integer, "
                             f"got {self.attribution_steps!r}")


def layout_for(dataset: str) -> MonthlyLayout:
    if dataset == "generated":
        return _generated_layout()
    if dataset not in LAYOUTS:
        raise CreditDataError(f"the sequence model needs monthly histories (taiwan, generated), "
                              f"not {dataset!r}", field="dataset")
    return LAYOUTS[dataset]


def feature_index(feature_names: list[str], column: str, level: str | None = None) -> int | None:
    """The pipeline feature that carries a raw field: its one-hot `name=level` for a categorical, the
    field itself, a generated month's aggregate (`x_m1` -> `x_last`, older months -> `x_mean6`), else
    the first feature with the field's prefix."""
    name = TAIWAN_FIELD_FEATURES.get(column, column)
    month = re.fullmatch(r"(.+)_m(\d+)", name)
    candidates = [f"{name}={level}"] if level is not None else []
    if month:
        candidates.append(f"{month[1]}_last" if month[2] == "1" else f"{month[1]}_mean6")
    candidates.append(name)
    for candidate in candidates:
        if candidate in feature_names:
            return feature_names.index(candidate)
    return next((i for i, f in enumerate(feature_names) if f.startswith(name)), None)


def level_strings(values: Any) -> np.ndarray:
    """Category values as the pipeline spells them in one-hot names: 2.0 -> "2", "retired" stays."""
    numeric = pd.api.types.is_numeric_dtype(values)
    number = values.to_numpy("float64") if numeric else pd.to_numeric(values, errors="coerce").to_numpy("float64")
    whole = ~np.isnan(number) & (number == np.round(number))
    text = number.astype(str) if numeric else values.astype(str).to_numpy()
    return np.where(whole, np.where(whole, number, 0).astype("int64").astype(str), text)


@register_model("sequence")
class SequenceModel(CreditModel):
    """A MoE Transformer over the six monthly tokens (finance.sequence), fed the raw records.

    Learned: classifier_ (the fitted SequenceClassifier)."""

    needs_records = True
    config_class = SequenceModelConfig

    def _fit(self, X: FitData, y: np.ndarray, sample_weight: np.ndarray | None, X_valid: FitData | None,
             y_valid: np.ndarray | None) -> None:
        if X_valid.records is None:
            raise ValueError("the sequence model reads raw records: eval_set X must be a FitData with records")
        c = self.config_
        self.classifier_ = SequenceClassifier(layout=layout_for(self.dataset), model=c.model,
                                              training=dataclasses.replace(c.training), seed=self.seed,
                                              attribution=c.attribution, attribution_steps=c.attribution_steps)
        self.classifier_.fit(X.records, y, sample_weight=sample_weight, eval_set=[(X_valid.records, y_valid)])

    def predict_proba(self, X: FitData | np.ndarray) -> np.ndarray:
        return self.classifier_.predict_proba(self._records(X))

    def contributions(self, X: FitData | np.ndarray) -> np.ndarray:
        data = self._records(X)
        pushes, columns = self.classifier_.attributions(data)
        out = np.zeros((len(pushes), len(self.features_)))
        categorical = set(self.classifier_.layout.static_categorical)
        for j, column in enumerate(columns):
            levels = level_strings(data[column]) if column in categorical else np.full(len(out), None)
            for level in pd.unique(levels):
                index = feature_index(self.features_, column, level)
                if index is not None:
                    rows = levels == level
                    out[rows, index] += pushes[rows, j]
        return out

    def _records(self, X: FitData | np.ndarray) -> pd.DataFrame:
        records = self._input(X).records
        if records is None:
            raise ValueError("the sequence model reads raw records: pass X as a FitData with records")
        return records

    def save(self, directory: Path) -> None:
        self.classifier_.save(directory)

    @classmethod
    def load(cls, directory: Path, *, feature_names: list[str], dataset: str) -> SequenceModel:
        classifier = SequenceClassifier.load(directory)
        config = SequenceModelConfig(model=classifier.model_.config, attribution=classifier.attribution,
                                     attribution_steps=classifier.attribution_steps)
        model = cls._restored(config=config, feature_names=feature_names, dataset=dataset)
        model.classifier_ = classifier
        return model

    def export_onnx(self, path: Path) -> Path:
        """ONNX of the network over the token tensors (finance.sequence.estimator.INPUT_NAMES); the
        tokenizer's fitted state is in the file's metadata."""
        return self.classifier_.export_onnx(path)

    def summary(self) -> dict[str, Any]:
        moe = self.classifier_.config_.moe
        return {"best_epoch": self.classifier_.best_epoch_, "layers": self.classifier_.config_.num_layers,
                "experts": moe.num_experts, "top_k": moe.top_k,
                "validation_auc": self.classifier_.validation_metrics_.get("val_auc"),
                "attribution": self.classifier_.attribution}


@dataclass
class SequenceEnsembleConfig(EnsembleConfig):
    members: list[str] = field(default_factory=lambda: ["lightgbm", "sequence"])  # trees + the monthly Transformer


@register_model("sequence-ensemble")
class SequenceEnsembleModel(EnsembleModel):
    config_class = SequenceEnsembleConfig
