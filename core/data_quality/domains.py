"""Level 2, domains: segments (client segments, operating regimes, image clusters) found by k-means
on the training data, how well the training data covers each, and rows from none of them.

Fields are scaled robustly (median, interquartile range) and compressed by sign(z) log(1 + |z|),
so that heavy-tailed credit fields (a debt ratio of 300,000) neither dominate the clusters nor
hide: the compression is monotone and unbounded, an extreme value stays far from every centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score


@dataclass(frozen=True)
class DomainConfig:
    max_segments: int = 8  # when the number is chosen from the data: 2..max_segments tried
    min_silhouette: float = 0.5  # below it the data has no clear regimes: one segment
    radius_quantile: float = 0.999  # a segment reaches as far as this share of its training rows
    radius_factor: float = 1.5  # a row beyond factor x that radius belongs to no training segment
    sample: int = 20_000  # rows k-means is fitted on (fitting on all of GMSC adds time, not segments)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.max_segments <= 64:
            raise ValueError(f"max_segments must be in 2..64, got {self.max_segments}")
        if not 0 < self.radius_quantile <= 1 or self.radius_factor < 1:
            raise ValueError("radius_quantile must be in (0, 1] and radius_factor >= 1")
        if self.sample < 100:
            raise ValueError(f"sample must be >= 100, got {self.sample}")


class SegmentModel:
    """fit(train (rows, fields), segments=None) -> self with `center_` (fields,), `scale_` (fields,),
    `centers_` (segments, fields), `radius_` (segments,), `train_share_` (segments,).
    assign(x) -> (segment (rows,), distance (rows,)); unseen(x) -> (rows,) bool.
    """

    def __init__(self, config: DomainConfig | None = None) -> None:
        self.config = config or DomainConfig()

    def _scaled(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.center_) / self.scale_
        z = np.sign(z) * np.log1p(np.abs(z))
        return np.nan_to_num(z, nan=0.0)  # a missing value sits at the median: it neither joins nor leaves a segment

    def fit(self, x: np.ndarray, segments: int | None = None) -> SegmentModel:
        cfg = self.config
        x = np.asarray(x, dtype=np.float64)
        if len(x) < 2:
            raise ValueError("at least two rows are needed to find segments")
        self.center_ = np.nanmedian(x, axis=0)
        q75, q25 = np.nanpercentile(x, [75, 25], axis=0)
        spread = np.where(np.isfinite(q75 - q25), q75 - q25, 0.0)
        fallback = np.nanstd(x, axis=0)  # a field with most values equal has no interquartile range
        self.scale_ = np.where(spread > 1e-12, spread, np.where(fallback > 1e-12, fallback, 1.0))
        self.center_ = np.nan_to_num(self.center_)
        z = self._scaled(x)
        rng = np.random.default_rng(cfg.seed)
        fit_rows = z if len(z) <= cfg.sample else z[rng.choice(len(z), cfg.sample, replace=False)]
        if segments is None:
            segments = self._choose(fit_rows)
        segments = max(1, min(segments, len(np.unique(fit_rows, axis=0))))
        kmeans = KMeans(segments, n_init=4, random_state=cfg.seed).fit(fit_rows)
        self.centers_ = kmeans.cluster_centers_
        segment, distance = self._nearest(z)
        self.radius_ = np.array([np.quantile(distance[segment == s], cfg.radius_quantile) if (segment == s).any()
                                 else 0.0 for s in range(segments)])
        self.train_share_ = np.bincount(segment, minlength=segments) / len(z)
        return self

    def _choose(self, z: np.ndarray) -> int:
        """The number of segments with the best silhouette (on at most 3,000 rows), or 1 when none is clear."""
        cfg = self.config
        sample = z[np.random.default_rng(cfg.seed).choice(len(z), min(len(z), 3000), replace=False)]
        best, best_score = 1, cfg.min_silhouette
        for k in range(2, min(cfg.max_segments, len(np.unique(sample, axis=0)) - 1) + 1):
            labels = KMeans(k, n_init=2, random_state=cfg.seed).fit_predict(sample)
            score = silhouette_score(sample, labels)
            if score > best_score:
                best, best_score = k, score
        return best

    def _nearest(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distance = np.sqrt(((z[:, None, :] - self.centers_[None, :, :]) ** 2).sum(-1))  # (rows, segments)
        segment = distance.argmin(axis=1)
        return segment, distance[np.arange(len(z)), segment]

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._nearest(self._scaled(x))

    def unseen(self, segment: np.ndarray, distance: np.ndarray) -> np.ndarray:
        """Rows farther from their nearest training segment than `radius_factor` x its radius."""
        return distance > self.config.radius_factor * np.maximum(self.radius_[segment], 1e-9)
