"""Points scaling: probability of default <-> score points by PDO (points to double the odds)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PointsScale:
    """score = offset + factor * ln(good:bad odds), factor = pdo / ln 2.

    Defaults are the common convention: 600 points at 50:1 good:bad odds, 20 points double the odds.
    """

    base_score: float = 600.0
    base_odds: float = 50.0
    pdo: float = 20.0

    @property
    def factor(self) -> float:
        return self.pdo / math.log(2)

    @property
    def offset(self) -> float:
        return self.base_score - self.factor * math.log(self.base_odds)

    def points(self, pd_: np.ndarray) -> np.ndarray:
        """(n,) probabilities of default -> (n,) score points (higher is safer), rounded to 0.1."""
        p = np.clip(np.asarray(pd_, dtype=np.float64), 1e-9, 1 - 1e-9)
        return np.round(self.offset + self.factor * np.log((1 - p) / p), 1)

    def probability(self, points: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp((np.asarray(points, dtype=np.float64) - self.offset) / self.factor))
