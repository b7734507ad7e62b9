"""The sequence models in the credit registry: `finance train --model sequence | sequence-ensemble`.

`sequence` is the SequenceClassifier behind the CreditModel interface (it reads the raw records);
`sequence-ensemble` is the credit ensemble with LightGBM (on the 200+ pipeline features) and the
sequence model as members, blended on the validation split. Reason codes: the sequence model's
occlusion attributions per raw field are placed on the pipeline feature that holds that field
(e.g. PAY_0 -> status_sep), so the scorer's reason codes read the same as for the other models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finance.errors import CreditDataError
from finance.models.base import CreditModel, FitData, register_model
from finance.models.ensemble import EnsembleConfig, EnsembleModel
from finance.sequence.estimator import SequenceClassifier, SequenceTrainingConfig
from finance.sequence.model import SequenceTransformerConfig
from finance.sequence.tokens import TAIWAN_LAYOUT, MonthlyLayout

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


def layout_for(dataset: str) -> MonthlyLayout:
    if dataset not in LAYOUTS:
        raise CreditDataError(f"the sequence model needs monthly histories; available for {sorted(LAYOUTS)}, "
                              f"not {dataset!r}", field="dataset")
    return LAYOUTS[dataset]


def feature_index(feature_names: list[str], column: str) -> int | None:
    """The pipeline feature that carries a raw field: exact name, else the first with its prefix."""
    name = TAIWAN_FIELD_FEATURES.get(column, column)
    if name in feature_names:
        return feature_names.index(name)
    return next((i for i, f in enumerate(feature_names) if f.startswith(name)), None)


@register_model("sequence")
class SequenceModel(CreditModel):
    """A MoE Transformer over the six monthly tokens (finance.sequence), fed the raw records."""

    needs_records = True
    config_class = SequenceModelConfig

    def fit(self, train: FitData, valid: FitData) -> SequenceModel:
        assert train.records is not None and valid.records is not None, "the sequence model reads raw records"
        self.classifier_ = SequenceClassifier(layout=layout_for(self.dataset), model=self.config.model,
                                              training=dataclasses.replace(self.config.training),
                                              seed=self.seed)
        self.classifier_.fit(train.records, train.y, sample_weight=train.sample_weight,
                             validation=(valid.records, valid.y))
        return self

    def predict_proba(self, data: FitData) -> np.ndarray:
        return self.classifier_.predict_proba(data.records)

    def contributions(self, data: FitData) -> np.ndarray:
        pushes, columns = self.classifier_.attributions(data.records)
        out = np.zeros((len(pushes), len(self.feature_names)))
        for j, column in enumerate(columns):
            index = feature_index(self.feature_names, column)
            if index is not None:
                out[:, index] += pushes[:, j]
        return out

    def save(self, directory: Path) -> None:
        self.classifier_.save(directory)

    @classmethod
    def load(cls, directory: Path, *, feature_names: list[str], dataset: str) -> SequenceModel:
        model = cls(feature_names=feature_names, dataset=dataset)
        model.classifier_ = SequenceClassifier.load(directory)
        model.config = SequenceModelConfig(model=model.classifier_.model_.config)
        return model

    def summary(self) -> dict[str, Any]:
        moe = self.classifier_.config_.moe
        return {"best_epoch": self.classifier_.best_epoch_, "layers": self.classifier_.config_.num_layers,
                "experts": moe.num_experts, "top_k": moe.top_k,
                "validation_auc": self.classifier_.validation_metrics_.get("val_auc")}


@dataclass
class SequenceEnsembleConfig(EnsembleConfig):
    members: list[str] = field(default_factory=lambda: ["lightgbm", "sequence"])  # trees + the monthly Transformer


@register_model("sequence-ensemble")
class SequenceEnsembleModel(EnsembleModel):
    config_class = SequenceEnsembleConfig
