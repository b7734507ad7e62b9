"""RUL metrics: RMSE and the asymmetric PHM08 (NASA) score."""

from __future__ import annotations

import numpy as np


def rmse(predicted: np.ndarray, true: np.ndarray) -> float:
    predicted, true = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if predicted.shape != true.shape:
        raise ValueError(f"shapes differ: {predicted.shape} vs {true.shape}")
    return float(np.sqrt(np.mean((predicted - true) ** 2)))


def nasa_score(predicted: np.ndarray, true: np.ndarray) -> float:
    """Sum over engines of exp(-d/13) - 1 for early (d < 0) and exp(d/10) - 1 for late predictions.

    d = predicted - true. Late predictions (the engine fails before the model said) cost more,
    as in Saxena et al. 2008. Lower is better; a perfect model scores 0.
    """
    d = np.asarray(predicted, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return float(np.sum(np.where(d < 0, np.exp(-d / 13.0) - 1.0, np.exp(d / 10.0) - 1.0)))


def rul_metrics(predicted: np.ndarray, true: np.ndarray, *, cap: float | None = 125.0) -> dict[str, float]:
    """RMSE and score against the true RUL capped at `cap` (the protocol of the published figures,
    whose targets are piecewise linear) and, beside them, RMSE against the raw true RUL."""
    true = np.asarray(true, dtype=np.float64)
    capped = np.minimum(true, cap) if cap is not None else true
    return {"rmse": rmse(predicted, capped), "score": nasa_score(predicted, capped),
            "rmse_uncapped": rmse(predicted, true), "engines": int(len(true))}
