"""SequenceClassifier: the sequence Transformer as a credit model (fit / predict_proba / save / load / ONNX)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from core.onnx_export import export_onnx
from core.trainer import Trainer, TrainerConfig, data_fingerprint, load_checkpoint, save_checkpoint
from finance.sequence.model import SequenceTransformer, SequenceTransformerConfig
from finance.sequence.tokens import TAIWAN_LAYOUT, MonthlyLayout, SequenceBatch, SequenceTokenizer

INPUT_NAMES = ("tokens", "status", "padding", "static_numeric", "static_categorical")
CHECKPOINT = "sequence.pt"


@dataclass
class SequenceTrainingConfig:
    batch_size: int = 256  # ~70 steps per epoch on Taiwan: enough updates, stable AUC estimates
    validation_share: float = 0.15  # held out of the training rows for early stopping (by AUC)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        learning_rate=1e-3,  # a small net trained from scratch for a few hundred steps
        weight_decay=0.05, warmup_fraction=0.05, grad_accumulation=1, max_epochs=25, patience=5,
        monitor="val_auc", mode="max", progress=False))

    def __post_init__(self) -> None:
        if isinstance(self.trainer, dict):
            self.trainer = TrainerConfig(**self.trainer)
        assert 0 < self.validation_share < 0.5, "validation_share must lie in (0, 0.5)"


def to_tensors(batch: SequenceBatch) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in batch)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


class SequenceClassifier:
    """A Transformer over monthly tokens, predicting default; an sklearn-style credit model.

    Args:
        layout: which columns hold each month's fields (Taiwan's by default).
        model: the network's config; the static widths are set from the data at fit time.
        training: batch size, validation share and the Trainer's config.
        seed: the split and the initialisation.
    fit(frame, y, sample_weight=None) -> self; predict_proba(frame) -> (n, 2).
    Learned: tokenizer_, model_ (SequenceTransformer), history_ (per-epoch metrics), best_epoch_.
    """

    def __init__(self, *, layout: MonthlyLayout = TAIWAN_LAYOUT, model: SequenceTransformerConfig | None = None,
                 training: SequenceTrainingConfig | None = None, seed: int = 0) -> None:
        self.layout = layout
        self.model = model
        self.training = training
        self.seed = seed

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        return {"layout": self.layout, "model": self.model, "training": self.training, "seed": self.seed}

    def set_params(self, **params: Any) -> SequenceClassifier:
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def _config(self, tokenizer: SequenceTokenizer) -> SequenceTransformerConfig:
        base = self.model or SequenceTransformerConfig()
        return dataclasses.replace(base, num_months=self.layout.months,
                                   num_token_features=self.layout.num_token_features,
                                   num_static_numeric=len(self.layout.static_numeric),
                                   static_cardinalities=tokenizer.cardinalities)

    def fit(self, X: pd.DataFrame, y: Any, sample_weight: Any = None,
            validation: tuple[pd.DataFrame, Any] | None = None) -> SequenceClassifier:
        """Train with early stopping on a stratified validation share (or the given `validation` set)."""
        from sklearn.model_selection import train_test_split

        training = self.training or SequenceTrainingConfig()
        y = np.asarray(y, dtype="float32")
        weight = np.ones(len(y), "float32") if sample_weight is None else np.asarray(sample_weight, "float32")
        if validation is None:
            fit_idx, val_idx = train_test_split(np.arange(len(y)), test_size=training.validation_share,
                                                stratify=y, random_state=self.seed)
            X_fit, y_fit, w_fit = X.iloc[fit_idx], y[fit_idx], weight[fit_idx]
            X_val, y_val = X.iloc[val_idx], y[val_idx]
        else:
            X_fit, y_fit, w_fit = X, y, weight
            X_val, y_val = validation[0], np.asarray(validation[1], dtype="float32")
        self.tokenizer_ = SequenceTokenizer(layout=self.layout).fit(X_fit)
        train, val = self.tokenizer_.transform(X_fit), self.tokenizer_.transform(X_val)
        torch.manual_seed(self.seed)
        self.config_ = self._config(self.tokenizer_)
        self.model_ = SequenceTransformer(self.config_)
        train_t, val_t = to_tensors(train), to_tensors(val)
        y_t, w_t = torch.from_numpy(y_fit), torch.from_numpy(w_fit / w_fit.mean())
        steps = int(np.ceil(len(y_fit) / training.batch_size))

        def batches(epoch: int):
            order = torch.randperm(len(y_fit), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            for start in range(0, len(order), training.batch_size):
                idx = order[start:start + training.batch_size]
                yield tuple(a[idx] for a in train_t), y_t[idx], w_t[idx]

        def loss_fn(model, batch):
            inputs, target, w = batch
            logits, aux = model(*inputs)
            return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).mean() + aux

        def evaluate_fn(model):
            logits = self._logits(model, val_t)
            loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y_val)).item()
            return {"val_loss": loss, "val_auc": roc_auc(y_val, logits.numpy())}

        result = Trainer(training.trainer).fit(self.model_, batches, steps, loss_fn, evaluate_fn)
        self.model_.eval()
        self.history_, self.best_epoch_ = result.history, result.best_epoch
        self.validation_metrics_ = result.best_metrics
        self.fingerprint_ = data_fingerprint(X_fit, y_fit)
        return self

    @staticmethod
    def _logits(model: SequenceTransformer, inputs: tuple[torch.Tensor, ...], chunk: int = 8192) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            n = len(inputs[0])
            return torch.cat([model(*(a[i:i + chunk] for a in inputs))[0] for i in range(0, n, chunk)])

    def decision_logits(self, X: pd.DataFrame) -> np.ndarray:
        """Log-odds of default, (n,)."""
        return self._logits(self.model_, to_tensors(self.tokenizer_.transform(X))).numpy()

    def attributions(self, X: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
        """Occlusion attributions: each raw field's push on the log-odds of default (> 0 raises risk).

        A field (one month's status, bill or payment, or a static field) is replaced by its
        reference, the average client (standardised 0, the commonest status or level), and the drop
        in log-odds is its contribution. Returns ((n, fields) float64, the raw column of each field).
        Padded months contribute 0.
        """
        batch = self.tokenizer_.transform(X)
        base = self._logits(self.model_, to_tensors(batch)).numpy().astype("float64")
        layout, columns, pushes = self.layout, [], []
        bill_features, payment_features = [0, 2, 4], [1, 3, 5]  # see tokens.TOKEN_FEATURES

        def push(edit) -> None:
            arrays = [a.copy() for a in batch]
            edit(arrays)
            pushes.append(base - self._logits(self.model_, to_tensors(SequenceBatch(*arrays))).numpy())

        for month in range(layout.months):
            real = ~batch.padding[:, month]
            columns += [layout.status[month], layout.bill[month], layout.payment[month]]
            push(lambda a, m=month, r=real: a[1].__setitem__((r, m), self.tokenizer_.status_mode_))
            push(lambda a, m=month: a[0].__setitem__((slice(None), m, bill_features), 0.0))
            push(lambda a, m=month: a[0].__setitem__((slice(None), m, payment_features), 0.0))
        for c, channel in enumerate(layout.channels):
            for month in range(layout.months):
                columns.append(channel[month])
                push(lambda a, m=month, f=len(bill_features + payment_features) + c:
                     a[0].__setitem__((slice(None), m, f), 0.0))
        for i, column in enumerate(layout.static_numeric):
            columns.append(column)
            push(lambda a, i=i: a[3].__setitem__((slice(None), i), 0.0))
        for i, column in enumerate(layout.static_categorical):
            columns.append(column)
            push(lambda a, i=i: a[4].__setitem__((slice(None), i), self.tokenizer_.static_mode_[i]))
        return np.stack(pushes, axis=1).astype("float64"), columns

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-self.decision_logits(X).astype("float64")))
        return np.stack([1.0 - p, p], axis=1)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return save_checkpoint(directory / CHECKPOINT, self.model_, config=self.config_,
                               metrics=self.validation_metrics_, data_fingerprint=self.fingerprint_,
                               extra={"tokenizer": self.tokenizer_.to_dict(), "seed": self.seed,
                                      "best_epoch": self.best_epoch_})

    @classmethod
    def load(cls, directory: str | Path) -> SequenceClassifier:
        model, metadata = load_checkpoint(Path(directory) / CHECKPOINT,
                                          lambda config: SequenceTransformer(SequenceTransformerConfig(**config)))
        tokenizer = SequenceTokenizer.from_dict(metadata["tokenizer"])
        self = cls(layout=tokenizer.layout, model=model.config, seed=metadata.get("seed", 0))
        self.tokenizer_, self.model_, self.config_ = tokenizer, model, model.config
        self.validation_metrics_, self.best_epoch_ = metadata["metrics"], metadata.get("best_epoch")
        self.fingerprint_, self.history_ = metadata["data_fingerprint"], []
        return self

    def export_onnx(self, path: str | Path, example: pd.DataFrame | None = None, *, version: str = "dev") -> Path:
        """ONNX with the five token tensors as inputs (`INPUT_NAMES`) and logits, aux_loss as outputs.

        The tokenizer (pandas) stays outside the graph; its fitted state is written into the model's
        metadata so a partner can reproduce it.
        """
        if example is not None:
            inputs = to_tensors(self.tokenizer_.transform(example.iloc[:4]))
        else:  # only the shapes matter for tracing: four blank clients
            cfg = self.config_
            inputs = (torch.zeros(4, cfg.num_months, cfg.num_token_features),
                      torch.zeros(4, cfg.num_months, dtype=torch.int64),
                      torch.zeros(4, cfg.num_months, dtype=torch.bool), torch.zeros(4, cfg.num_static_numeric),
                      torch.zeros(4, len(cfg.static_cardinalities), dtype=torch.int64))
        static_model = SequenceTransformer(self.config_, static=True)
        static_model.load_state_dict(self.model_.state_dict())
        return export_onnx(static_model.eval(), inputs, path, input_names=INPUT_NAMES,
                           output_names=["logits", "aux_loss"],
                           metadata={"model": "finance-sequence-transformer", "version": version,
                                     "tokenizer": json.dumps(self.tokenizer_.to_dict())})

    def onnx_inputs(self, X: pd.DataFrame) -> dict[str, torch.Tensor]:
        return dict(zip(INPUT_NAMES, to_tensors(self.tokenizer_.transform(X)), strict=True))
