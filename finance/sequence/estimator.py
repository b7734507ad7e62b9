"""SequenceClassifier: the sequence Transformer as a credit model (fit / predict_proba / save / load / ONNX)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin

from core.onnx_export import export_onnx
from core.trainer import Trainer, TrainerConfig, data_fingerprint, load_checkpoint, save_checkpoint
from finance.sequence.model import SequenceTransformer, SequenceTransformerConfig
from finance.sequence.tokens import TAIWAN_LAYOUT, MonthlyLayout, SequenceBatch, SequenceTokenizer

INPUT_NAMES = ("tokens", "status", "padding", "static_numeric", "static_categorical")
CHECKPOINT = "sequence.pt"
ATTRIBUTIONS = ("integrated-gradients", "occlusion")


class Field(NamedTuple):
    """One raw field of the attributions and where it sits in the model's inputs."""

    column: str  # the raw column
    kind: str  # "status", "tokens", "static_numeric" or "static_categorical"
    month: int | None = None  # the month slot (oldest first) for monthly fields
    index: tuple[int, ...] = ()  # token features, or the static field's position


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
        if not 0 < self.validation_share < 0.5:
            raise ValueError(f"SequenceTrainingConfig: validation_share must lie in (0, 0.5), "
                             f"got {self.validation_share!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"SequenceTrainingConfig: batch_size must be a positive integer, got {self.batch_size!r}")


def to_tensors(batch: SequenceBatch) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in batch)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


class SequenceClassifier(ClassifierMixin, BaseEstimator):
    """A Transformer over monthly tokens, predicting default; a scikit-learn binary classifier over raw records.

    Args:
        layout: which columns hold each month's fields (Taiwan's by default).
        model: the network's config; the static widths are set from the data at fit time.
        training: batch size, validation share and the Trainer's config.
        seed: the split and the initialisation.
        attribution, attribution_steps: how reason codes are computed (see `attributions`).
    fit(frame, y, *, sample_weight=None, eval_set=None) -> self; predict_proba(frame) -> (n, 2).
    Learned: tokenizer_, model_ (SequenceTransformer), config_, classes_, history_ (per-epoch
    metrics), best_epoch_, validation_metrics_.
    """

    def __init__(self, *, layout: MonthlyLayout = TAIWAN_LAYOUT, model: SequenceTransformerConfig | None = None,
                 training: SequenceTrainingConfig | None = None, seed: int = 0,
                 attribution: str = "occlusion", attribution_steps: int = 8) -> None:
        self.layout = layout
        self.model = model
        self.training = training
        self.seed = seed
        # Reason codes: exact occlusion, batched into one pass (about one prediction's time for one
        # applicant); integrated gradients agree with it on ~70% of top reasons (benchmarks/RESULTS.md)
        # and cost less for wide layouts in batches (steps rows per applicant, not 1 + fields).
        self.attribution = attribution
        self.attribution_steps = attribution_steps  # integrated-gradient midpoints (batched, not sequential)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.dataframe = True  # raw records, one column per field
        tags.input_tags.allow_nan = True
        tags.classifier_tags.multi_class = False
        return tags

    def _config(self, tokenizer: SequenceTokenizer) -> SequenceTransformerConfig:
        base = self.model or SequenceTransformerConfig()
        return dataclasses.replace(base, num_months=self.layout.months,
                                   num_token_features=self.layout.num_token_features,
                                   num_static_numeric=len(self.layout.static_numeric),
                                   static_cardinalities=tokenizer.cardinalities)

    def fit(self, X: pd.DataFrame, y: Any, *, sample_weight: Any = None,
            eval_set: list[tuple[pd.DataFrame, Any]] | None = None) -> SequenceClassifier:
        """Train with early stopping on a stratified validation share (or eval_set=[(X_valid, y_valid)])."""
        from sklearn.model_selection import train_test_split

        if self.attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {self.attribution!r}")
        if eval_set is not None and (len(eval_set) != 1 or len(eval_set[0]) != 2):
            raise ValueError("eval_set must be [(X_valid, y_valid)]: one validation set")
        training = self.training or SequenceTrainingConfig()
        labels = np.asarray(y)
        self.classes_ = np.unique(labels)
        if len(self.classes_) != 2:
            raise ValueError(f"a credit model needs two classes (good and default), y has {len(self.classes_)}")
        y = (labels == self.classes_[1]).astype("float32")
        weight = np.ones(len(y), "float32") if sample_weight is None else np.asarray(sample_weight, "float32")
        if eval_set is None:
            fit_idx, val_idx = train_test_split(np.arange(len(y)), test_size=training.validation_share,
                                                stratify=y, random_state=self.seed)
            X_fit, y_fit, w_fit = X.iloc[fit_idx], y[fit_idx], weight[fit_idx]
            X_val, y_val = X.iloc[val_idx], y[val_idx]
        else:
            X_fit, y_fit, w_fit = X, y, weight
            X_val, y_val = eval_set[0][0], (np.asarray(eval_set[0][1]) == self.classes_[1]).astype("float32")
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

    def attributions(self, X: pd.DataFrame, method: str | None = None,
                     steps: int | None = None) -> tuple[np.ndarray, list[str]]:
        """Each raw field's push on the log-odds of default (> 0 raises risk), against a reference
        client: the average one (standardised 0, the commonest status or level). A field is one
        month's status, bill or payment, one month of a further channel, or a static field.

        method (default `self.attribution`):
        - "integrated-gradients": the path from the reference to the applicant in the model's
          continuous input space (status and levels through their embeddings), `steps` midpoints
          batched into one forward and one backward pass; the pushes add up to about
          logit(applicant) - logit(reference).
        - "occlusion": the field alone set to its reference; its push is the drop in log-odds.
          Exact per field, one forward pass over (1 + fields) copies of the rows.
        Returns ((n, fields) float64, the raw column of each field). Padded months contribute 0.
        """
        method = method or self.attribution
        if method not in ATTRIBUTIONS:
            raise ValueError(f"attribution method must be one of {ATTRIBUTIONS}, got {method!r}")
        batch = self.tokenizer_.transform(X)
        fields = self._fields()
        if method == "occlusion":
            pushes = self._occlusion(batch, fields)
        else:
            pushes = self._integrated_gradients(batch, fields, steps or self.attribution_steps)
        return pushes.astype("float64"), [f.column for f in fields]

    def _fields(self) -> list[Field]:
        layout, fields = self.layout, []
        bill_features, payment_features = (0, 2, 4), (1, 3, 5)  # see tokens.TOKEN_FEATURES
        for month in range(layout.months):
            fields += [Field(layout.status[month], "status", month),
                       Field(layout.bill[month], "tokens", month, bill_features),
                       Field(layout.payment[month], "tokens", month, payment_features)]
        first_channel = len(bill_features + payment_features)
        for c, channel in enumerate(layout.channels):
            fields += [Field(channel[month], "tokens", month, (first_channel + c,)) for month in range(layout.months)]
        fields += [Field(column, "static_numeric", index=(i,)) for i, column in enumerate(layout.static_numeric)]
        fields += [Field(column, "static_categorical", index=(i,))
                   for i, column in enumerate(layout.static_categorical)]
        return fields

    def _occlusion(self, batch: SequenceBatch, fields: list[Field]) -> np.ndarray:
        """(n, fields): logit(rows) - logit(rows with one field at its reference)."""
        n, copies = len(batch), len(fields) + 1
        out = []
        rows_per_chunk = max(1, 16384 // copies)  # bounds the stacked batch's memory
        for start in range(0, n, rows_per_chunk):
            part = batch.take(np.arange(start, min(n, start + rows_per_chunk)))
            stacked = [np.concatenate([a] * copies) for a in part]  # copy k holds field k - 1 at its reference
            m = len(part)
            for k, f in enumerate(fields, start=1):
                rows = slice(k * m, (k + 1) * m)
                if f.kind == "status":
                    real = np.flatnonzero(~part.padding[:, f.month]) + k * m
                    stacked[1][real, f.month] = self.tokenizer_.status_mode_
                elif f.kind == "tokens":
                    stacked[0][rows, f.month, list(f.index)] = 0.0
                elif f.kind == "static_numeric":
                    stacked[3][rows, f.index[0]] = 0.0
                else:
                    stacked[4][rows, f.index[0]] = self.tokenizer_.static_mode_[f.index[0]]
            logits = self._logits(self.model_, to_tensors(SequenceBatch(*stacked))).numpy().reshape(copies, m)
            out.append((logits[0] - logits[1:]).T)
        return np.concatenate(out)

    def _integrated_gradients(self, batch: SequenceBatch, fields: list[Field], steps: int) -> np.ndarray:
        """(n, fields): integrated gradients (midpoint rule), summed over each field's inputs."""
        assert steps >= 1, f"attribution steps must be >= 1, got {steps}"
        model = self.model_.eval()
        alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps  # (steps,)
        out = []
        rows_per_chunk = max(1, 16384 // steps)
        for start in range(0, len(batch), rows_per_chunk):
            tokens, status, padding, static_numeric, static_categorical = to_tensors(
                batch.take(np.arange(start, min(len(batch), start + rows_per_chunk))))
            n = len(status)
            with torch.no_grad():
                reference_status = torch.where(padding, status, torch.full_like(status, self.tokenizer_.status_mode_))
                modes = torch.tensor(self.tokenizer_.static_mode_, dtype=torch.int64).expand(n, -1)
                actual = (tokens, model.status_embedding(status), static_numeric,
                          model.embed_static(static_categorical))
                reference = (torch.zeros_like(tokens), model.status_embedding(reference_status),
                             torch.zeros_like(static_numeric), model.embed_static(modes))
            deltas = [a - r for a, r in zip(actual, reference, strict=True)]
            shape = lambda a: (steps, *a.shape)  # noqa: E731
            path = [(r[None] + alphas.view(-1, *[1] * r.dim()) * d[None]).reshape(-1, *r.shape[1:])
                    .requires_grad_(True) for r, d in zip(reference, deltas, strict=True)]  # (steps * n, ...)
            with torch.enable_grad():
                logits, _ = model.forward_embedded(path[0], path[1], padding.repeat(steps, 1), path[2], path[3])
                grads = torch.autograd.grad(logits.sum(), path)
            tok, stat, num, cat = (d * g.reshape(shape(d)).mean(0) for d, g in zip(deltas, grads, strict=True))
            stat, cat = stat.sum(-1), cat.sum(-1)  # (n, T), (n, C): an embedding's dimensions are one field
            columns = []
            for f in fields:
                if f.kind == "status":
                    columns.append(stat[:, f.month])
                elif f.kind == "tokens":
                    columns.append(tok[:, f.month, list(f.index)].sum(-1))
                else:
                    columns.append((num if f.kind == "static_numeric" else cat)[:, f.index[0]])
            out.append(torch.stack(columns, dim=1).numpy())
        return np.concatenate(out)

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-self.decision_logits(X).astype("float64")))
        return np.stack([1.0 - p, p], axis=1)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return save_checkpoint(directory / CHECKPOINT, self.model_, config=self.config_,
                               metrics=self.validation_metrics_, data_fingerprint=self.fingerprint_,
                               extra={"tokenizer": self.tokenizer_.to_dict(), "seed": self.seed,
                                      "attribution": self.attribution, "attribution_steps": self.attribution_steps,
                                      "best_epoch": self.best_epoch_})

    @classmethod
    def load(cls, directory: str | Path) -> SequenceClassifier:
        model, metadata = load_checkpoint(Path(directory) / CHECKPOINT,
                                          lambda config: SequenceTransformer(SequenceTransformerConfig(**config)))
        tokenizer = SequenceTokenizer.from_dict(metadata["tokenizer"])
        self = cls(layout=tokenizer.layout, model=model.config, seed=metadata.get("seed", 0),
                   **{k: metadata[k] for k in ("attribution", "attribution_steps") if k in metadata})
        self.tokenizer_, self.model_, self.config_ = tokenizer, model, model.config
        self.classes_ = np.array([0, 1])
        self.validation_metrics_, self.best_epoch_ = metadata["metrics"], metadata.get("best_epoch")
        self.fingerprint_, self.history_ = metadata["data_fingerprint"], []
        return self

    def export_onnx(self, path: str | Path, example: pd.DataFrame | None = None, *, version: str = "dev",
                    moe_dispatch: Literal["static", "sparse"] = "static") -> Path:
        """ONNX with the five token tensors as inputs (`INPUT_NAMES`) and logits, aux_loss as outputs.

        The tokenizer (pandas) stays outside the graph; its fitted state is written into the model's
        metadata so a partner can reproduce it. `moe_dispatch` as `core.onnx_export.export_onnx`:
        "sparse" runs only the routed experts (the partner bundle's occlusion pass stacks 24 copies of
        every row, where the static path's every-expert activations outgrew 24 GiB at 4,096 rows).
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
                           output_names=["logits", "aux_loss"], moe_dispatch=moe_dispatch,
                           metadata={"model": "finance-sequence-transformer", "version": version,
                                     "tokenizer": json.dumps(self.tokenizer_.to_dict())})

    def onnx_inputs(self, X: pd.DataFrame) -> dict[str, torch.Tensor]:
        return dict(zip(INPUT_NAMES, to_tensors(self.tokenizer_.transform(X)), strict=True))
