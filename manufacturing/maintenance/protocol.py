"""The validation protocol on training engines, shared by the CLI and the benchmark.

Split the run-to-failure engines by unit, train on one part (early stopping on the other's
windows), cut each held-back engine at random cycles as the official test set is, and score
RMSE and the NASA score on the last cycle of each cut engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from manufacturing.maintenance.errors import MaintenanceDataError
from manufacturing.maintenance.metrics import rul_metrics
from manufacturing.maintenance.rul import RULEstimator
from manufacturing.maintenance.split import split_units, truncate_units


@dataclass
class ProtocolConfig:
    val_fraction: float = 0.2  # 20 of FD001's 100 engines; 52 of FD002's 260
    cuts_per_unit: int = 5  # random cuts per held-back engine: one draw of 20 engines is noisy
    seed: int = 0


def score_test(estimator: RULEstimator, test: pd.DataFrame, true_rul: np.ndarray, *,
               source: str = "test") -> tuple[dict[str, Any], pd.DataFrame]:
    """Predict each test unit's RUL at its last cycle and score it against `true_rul` (unit order)."""
    predicted = estimator.predict(test, source=source)
    if len(predicted) != len(true_rul):
        raise MaintenanceDataError(f"{len(predicted)} test units but {len(true_rul)} RUL values", source=source,
                                   field="rul")
    predicted["true_rul"] = true_rul
    return rul_metrics(predicted["rul"].to_numpy(), true_rul, cap=estimator.net.rul_cap), predicted


def train_and_validate(estimator: RULEstimator, frame: pd.DataFrame, protocol: ProtocolConfig | None = None, *,
                       keep_predictions: bool = False) -> tuple[RULEstimator, dict[str, Any]]:
    """Fit on a unit split of `frame` and return (fitted estimator, validation metrics).

    keep_predictions: add `val_predictions`, one record per scored cut (`unit`, `cycle` kept,
    `rul` predicted, `true_rul`), for error analysis.
    """
    protocol = protocol or ProtocolConfig()
    train_units, val_units = split_units(frame["unit"].to_numpy(), val_fraction=protocol.val_fraction,
                                         seed=protocol.seed)
    train = frame[frame["unit"].isin(train_units)]
    val = frame[frame["unit"].isin(val_units)]
    estimator.fit(train, val_frame=val)
    cut, true_rul = truncate_units(val, seed=protocol.seed, cuts_per_unit=protocol.cuts_per_unit)
    metrics, predicted = score_test(estimator, cut, true_rul, source="validation engines")
    metrics = {"val_" + k: v for k, v in metrics.items()}
    if keep_predictions:
        metrics["val_predictions"] = predicted.to_dict(orient="records")
    if estimator.net_.members > 1:  # what each member scores alone, beside the ensemble
        metrics["val_member_rmse"] = [
            rul_metrics(estimator.predict(cut, member=k)["rul"].to_numpy(), true_rul, cap=estimator.net.rul_cap)["rmse"]
            for k in range(estimator.net_.members)]
    metrics.update(val_units=len(val_units), train_units=len(train_units),
                   cuts_per_unit=protocol.cuts_per_unit,
                   **{key: estimator.metadata_[key] for key in ("members", "train_seconds", "best_epoch", "epochs_run",
                                                                "parameters")})
    return estimator, metrics
