"""Level 3, labels: confident learning (Northcutt et al., cleanlab) on out-of-fold probabilities.

Each row's label is predicted by a LightGBM model that never saw the row (k-fold), and cleanlab's
`find_label_issues` flags the rows whose given label is unlikely under the per-class thresholds
it estimates from those probabilities.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd


class TooFewLabels(ValueError):
    """A class with fewer rows than folds: its out-of-fold probabilities cannot be estimated."""


@dataclass(frozen=True)
class LabelConfig:
    folds: int = 5
    trees: int = 200
    learning_rate: float = 0.05
    leaves: int = 31
    # One thread: on a loaded 2-core machine LightGBM's OpenMP threads spin against the other work
    # (200 trees on 19,000 rows: 0.33 s on one thread, 2.1 s on two, measured under load here).
    threads: int = 1
    filter_by: str = "prune_by_noise_rate"  # cleanlab's default rule
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.folds <= 20:
            raise ValueError(f"folds must be in 2..20, got {self.folds}")
        if self.trees < 1 or self.leaves < 2 or self.threads < 1 or not 0 < self.learning_rate <= 1:
            raise ValueError("trees >= 1, leaves >= 2, threads >= 1 and learning_rate in (0, 1] are required")
        if self.filter_by not in ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                                  "predicted_neq_given"):
            raise ValueError(f"unknown cleanlab filter {self.filter_by!r}")


def lightgbm(config: LabelConfig):
    from lightgbm import LGBMClassifier

    return LGBMClassifier(n_estimators=config.trees, learning_rate=config.learning_rate, num_leaves=config.leaves,
                          n_jobs=config.threads, random_state=config.seed, verbose=-1)


def out_of_fold_probabilities(x: pd.DataFrame, labels: np.ndarray, config: LabelConfig) -> np.ndarray:
    """(rows, classes) probabilities, each from the fold model that did not train on the row.

    x: numeric columns (NaN allowed, LightGBM routes it) and pandas categoricals.
    """
    from sklearn.model_selection import StratifiedKFold

    classes = np.unique(labels)
    probabilities = np.zeros((len(labels), len(classes)))
    folds = StratifiedKFold(config.folds, shuffle=True, random_state=config.seed)
    for train, held in folds.split(np.zeros(len(labels)), labels):
        model = lightgbm(config).fit(x.iloc[train], labels[train])
        probabilities[np.ix_(held, np.searchsorted(classes, model.classes_))] = model.predict_proba(x.iloc[held])
    return probabilities


def label_issues(x: pd.DataFrame, labels: np.ndarray,
                 config: LabelConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((rows,) bool label issues, (rows,) out-of-fold probability of the given label).

    labels: 0..classes-1 ints. Too few rows of a class for the folds: TooFewLabels says so.
    """
    from cleanlab.filter import find_label_issues

    config = config or LabelConfig()
    counts = np.bincount(labels)
    if len(counts) < 2 or counts.min() < config.folds:
        raise TooFewLabels(f"every class needs at least {config.folds} rows for {config.folds}-fold probabilities "
                         f"(class counts {counts.tolist()})")
    probabilities = out_of_fold_probabilities(x, labels, config)
    with contextlib.redirect_stdout(sys.stderr):  # cleanlab may print notes; stdout belongs to --json
        issues = find_label_issues(labels, probabilities, filter_by=config.filter_by, n_jobs=1)
    return issues, probabilities[np.arange(len(labels)), labels]
