"""The sequence Transformer blended with LightGBM: a weighted sum of their log-odds, the weight chosen
on a validation split neither model trained on (GBDT often wins on behaviour tables; the blend wins
more often still, as in AmEx's default-prediction results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finance.sequence.estimator import SequenceClassifier, SequenceTrainingConfig, roc_auc

BLEND_FILE = "blend.json"
LIGHTGBM_FILE = "lightgbm.txt"


def lightgbm_classifier(seed: int = 0, threads: int = 1) -> Any:
    """The LightGBM peer: shallow trees and a slow rate with early stopping (tens of thousands of rows)."""
    from lightgbm import LGBMClassifier

    return LGBMClassifier(n_estimators=3000, learning_rate=0.02, num_leaves=15, min_child_samples=50,
                          subsample=0.8, subsample_freq=1, colsample_bytree=0.7, reg_lambda=1.0,
                          random_state=seed, n_jobs=threads, verbose=-1)


def fit_lightgbm(model: Any, X: pd.DataFrame, y: np.ndarray, X_val: pd.DataFrame, y_val: np.ndarray,
                 sample_weight: np.ndarray | None = None) -> Any:
    import lightgbm

    # Early stopping on the validation log-loss: AUC on a few thousand rows is noisy enough to stop a
    # slow-rate model after a dozen trees.
    return model.fit(X, y, sample_weight=sample_weight, eval_X=(X_val,), eval_y=(y_val,),
                     callbacks=[lightgbm.early_stopping(200, verbose=False)])


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


class SequenceEnsemble:
    """sigmoid(w * sequence log-odds + (1 - w) * LightGBM log-odds), w on a grid, picked by validation AUC.

    Args:
        sequence: the SequenceClassifier to train (a fresh default one when None).
        validation_share: rows held out of both models' training, for early stopping and for w.
        weights: the grid for w (0 = LightGBM alone, 1 = the sequence model alone).
        seed: split and models.
    Learned: sequence_, lightgbm_, weight_, validation_auc_ ({"sequence", "lightgbm", "blend"}).
    """

    def __init__(self, *, sequence: SequenceClassifier | None = None, validation_share: float = 0.15,
                 weights: tuple[float, ...] = tuple(np.round(np.linspace(0, 1, 21), 2)), seed: int = 0) -> None:
        self.sequence = sequence
        self.validation_share = validation_share
        self.weights = weights
        self.seed = seed

    def fit(self, X: pd.DataFrame, y: Any, sample_weight: Any = None) -> SequenceEnsemble:
        from sklearn.model_selection import train_test_split

        y = np.asarray(y, dtype="int64")
        weight = None if sample_weight is None else np.asarray(sample_weight, dtype="float64")
        fit_idx, val_idx = train_test_split(np.arange(len(y)), test_size=self.validation_share,
                                            stratify=y, random_state=self.seed)
        X_fit, X_val = X.iloc[fit_idx], X.iloc[val_idx]
        w_fit = None if weight is None else weight[fit_idx]
        sequence = self.sequence or SequenceClassifier(training=SequenceTrainingConfig(), seed=self.seed)
        self.sequence_ = sequence.fit(X_fit, y[fit_idx], sample_weight=w_fit, validation=(X_val, y[val_idx]))
        self.lightgbm_ = fit_lightgbm(lightgbm_classifier(self.seed), X_fit, y[fit_idx], X_val, y[val_idx], w_fit)
        seq_val = self.sequence_.decision_logits(X_val)
        lgb_val = logit(self.lightgbm_.predict_proba(X_val)[:, 1])
        aucs = [roc_auc(y[val_idx], w * seq_val + (1 - w) * lgb_val) for w in self.weights]
        self.weight_ = float(self.weights[int(np.argmax(aucs))])
        self.validation_auc_ = {"sequence": roc_auc(y[val_idx], seq_val), "lightgbm": roc_auc(y[val_idx], lgb_val),
                                "blend": float(max(aucs))}
        return self

    def component_logits(self, X: pd.DataFrame) -> dict[str, np.ndarray]:
        return {"sequence": self.sequence_.decision_logits(X).astype("float64"),
                "lightgbm": logit(self.lightgbm_.predict_proba(X)[:, 1])}

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        parts = self.component_logits(X)
        z = self.weight_ * parts["sequence"] + (1 - self.weight_) * parts["lightgbm"]
        p = 1.0 / (1.0 + np.exp(-z))
        return np.stack([1.0 - p, p], axis=1)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.sequence_.save(directory)
        self.lightgbm_.booster_.save_model(str(directory / LIGHTGBM_FILE))
        (directory / BLEND_FILE).write_text(json.dumps({"weight": self.weight_, "seed": self.seed,
                                                         "validation_auc": self.validation_auc_}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SequenceEnsemble:
        import lightgbm

        directory = Path(directory)
        blend = json.loads((directory / BLEND_FILE).read_text())
        self = cls(seed=blend["seed"])
        self.sequence_ = SequenceClassifier.load(directory)
        self.lightgbm_ = _BoosterClassifier(lightgbm.Booster(model_file=str(directory / LIGHTGBM_FILE)))
        self.weight_, self.validation_auc_ = blend["weight"], blend["validation_auc"]
        return self


class _BoosterClassifier:
    """A loaded LightGBM booster behind predict_proba (the sklearn wrapper cannot be rebuilt from a file)."""

    def __init__(self, booster: Any) -> None:
        self.booster_ = booster

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = self.booster_.predict(X)
        return np.stack([1.0 - p, p], axis=1)
