"""Operating regimes, informative sensors and per-regime normalisation for C-MAPSS.

Under six operating conditions (FD002, FD004) a sensor's level is set mostly by the condition,
not by wear; normalising each sensor within its condition leaves the degradation trend. Regimes
are found by k-means on the three settings (they sit at six tight points), and a sensor is kept
when it trends with age inside most engines.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from manufacturing.maintenance.cmapss import SENSORS, SETTINGS
from manufacturing.maintenance.errors import MaintenanceDataError


@dataclass
class FeatureConfig:
    num_regimes: int = 1  # 6 for FD002/FD004 (six operating conditions), 1 otherwise
    # A sensor is informative when the median over engines of |corr(sensor, cycle)| inside an
    # engine reaches this. On the four training sets the trend of the flat sensors (s_1, s_5,
    # s_6, s_10, s_16, s_18, s_19) tops out at 0.38 and that of the rest starts at 0.47; this
    # picks the field's usual 14 in every subset, fan-fault sensors of FD003/FD004 included.
    min_trend: float = 0.42
    regime_features: bool = True  # append a one-hot of the regime when num_regimes > 1
    # Operating history: the cycles each unit has spent so far in each regime (/ 100), appended
    # after the sensors (one column, the unit's age, when there is one regime). A 30-cycle window
    # cannot see how old the engine is; its age and the regimes it ran in are known from the file.
    history: bool = False
    # Long-range sensor history: the mean of each normalised sensor over the unit's cycles so far
    # (since its first cycle), appended last. Engines start at different levels of wear; against
    # the window's current readings this mean tells how far this engine has drifted from its own
    # start, which 30 cycles alone cannot.
    running_mean: bool = False
    seed: int = 0  # k-means initialisation

    def __post_init__(self) -> None:
        if not isinstance(self.num_regimes, numbers.Integral) or self.num_regimes < 1:
            raise ValueError(f"FeatureConfig: num_regimes must be an integer >= 1, got {self.num_regimes!r}")
        if not 0 <= self.min_trend < 1:
            raise ValueError(f"FeatureConfig: min_trend must be in [0, 1), got {self.min_trend!r}")


HISTORY_SCALE = 100.0  # cycles: engines live 128-543 cycles, so the counts stay near 0-5


class ConditionNormalizer:
    """Find regimes, pick sensors, standardise each sensor within its regime.

    fit(frame) -> self, with `setting_scale_` (3,), `centers_` (regimes, 3) in scaled settings,
    `sensors_` (names kept), `mean_` and `std_` (regimes, sensors).
    transform(frame) -> (rows, features) float32: the kept sensors, normalised, then the regime
    one-hot when there is more than one regime, then (as configured) the regime history and the
    running means of the normalised sensors.
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config or FeatureConfig()

    @property
    def num_features(self) -> int:
        cfg = self.config
        extra = cfg.num_regimes if cfg.num_regimes > 1 and cfg.regime_features else 0
        running = len(self.sensors_) if cfg.running_mean else 0
        return len(self.sensors_) + extra + (cfg.num_regimes if cfg.history else 0) + running

    def regimes(self, settings: np.ndarray) -> np.ndarray:
        """settings: (rows, 3) -> (rows,) regime index of the nearest centre."""
        scaled = np.asarray(settings, dtype=np.float64) / self.setting_scale_
        distance = ((scaled[:, None, :] - self.centers_[None, :, :]) ** 2).sum(-1)  # (rows, regimes)
        return distance.argmin(axis=1)

    def fit(self, frame: pd.DataFrame) -> ConditionNormalizer:
        cfg = self.config
        settings = frame[SETTINGS].to_numpy(dtype=np.float64)
        scale = settings.std(axis=0)
        self.setting_scale_ = np.where(scale > 1e-12, scale, 1.0)
        if cfg.num_regimes > 1:
            kmeans = KMeans(cfg.num_regimes, n_init=10, random_state=cfg.seed).fit(settings / self.setting_scale_)
            self.centers_ = kmeans.cluster_centers_
        else:
            self.centers_ = (settings / self.setting_scale_).mean(axis=0, keepdims=True)
        regime = self.regimes(settings)
        sensors = frame[SENSORS].to_numpy(dtype=np.float64)
        mean = np.zeros((cfg.num_regimes, len(SENSORS)))
        std = np.ones((cfg.num_regimes, len(SENSORS)))
        for r in range(cfg.num_regimes):
            rows = sensors[regime == r]
            if len(rows):
                mean[r] = rows.mean(axis=0)
                std[r] = np.where(rows.std(axis=0) > 1e-9, rows.std(axis=0), np.inf)  # flat: maps to 0
        trend = pd.Series(_median_unit_trend((sensors - mean[regime]) / std[regime], frame["unit"].to_numpy(),
                                             frame["cycle"].to_numpy()), index=SENSORS)
        self.trend_ = trend.to_dict()
        self.sensors_ = [s for s in SENSORS if trend[s] >= cfg.min_trend]
        if not self.sensors_:
            raise MaintenanceDataError(
                f"no sensor trends with age (min_trend={cfg.min_trend}): is this run-to-failure data?")
        keep = [SENSORS.index(s) for s in self.sensors_]
        self.mean_, self.std_ = mean[:, keep], std[:, keep]
        return self

    def transform_arrays(self, settings: np.ndarray, sensors: np.ndarray,
                         history: np.ndarray | None = None, running: np.ndarray | None = None) -> np.ndarray:
        """settings (rows, 3), sensors (rows, len(sensors_)) in `sensors_` order -> (rows, features).

        history: (rows, regimes) cycles spent in each regime up to and including each row's cycle;
        needed when `config.history` (`regime_history` counts them for a frame).
        running: (rows, len(sensors_)) means of the normalised sensors over each row's unit up to and
        including the row; needed when `config.running_mean` (`running_means` takes them from a frame).
        """
        cfg = self.config
        regime = self.regimes(settings)
        parts = [self.normalise(settings, sensors)]
        if cfg.num_regimes > 1 and cfg.regime_features:
            parts.append(np.eye(cfg.num_regimes)[regime])
        if cfg.history:
            if history is None or history.shape != (len(regime), cfg.num_regimes):
                raise ValueError(f"history features need ({len(regime)}, {cfg.num_regimes}) regime counts, got "
                                 f"{None if history is None else history.shape}")
            parts.append(np.asarray(history, dtype=np.float64) / HISTORY_SCALE)
        if cfg.running_mean:
            if running is None or running.shape != parts[0].shape:
                raise ValueError(f"running-mean features need {parts[0].shape} running means, got "
                                 f"{None if running is None else running.shape}")
            parts.append(np.asarray(running, dtype=np.float64))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def regime_history(self, frame: pd.DataFrame) -> np.ndarray:
        """(rows, regimes): cycles each row's unit has spent in each regime so far, this row
        included (rows sorted by unit, then cycle; the count of rows, so gaps in `cycle` do not matter)."""
        one_hot = np.eye(self.config.num_regimes)[self.regimes(frame[SETTINGS].to_numpy())]
        return pd.DataFrame(one_hot).groupby(frame["unit"].to_numpy()).cumsum().to_numpy()

    def normalise(self, settings: np.ndarray, sensors: np.ndarray) -> np.ndarray:
        """settings (rows, 3), sensors (rows, len(sensors_)) -> (rows, len(sensors_)) standardised in their regime."""
        regime = self.regimes(settings)
        return (np.asarray(sensors, dtype=np.float64) - self.mean_[regime]) / self.std_[regime]

    def running_means(self, frame: pd.DataFrame) -> np.ndarray:
        """(rows, len(sensors_)): the mean of the normalised sensors over each row's unit so far, this
        row included (rows sorted by unit, then cycle, as for `regime_history`)."""
        normalised = pd.DataFrame(self.normalise(frame[SETTINGS].to_numpy(), frame[self.sensors_].to_numpy()))
        grouped = normalised.groupby(frame["unit"].to_numpy(), sort=False)
        return (grouped.cumsum() / (grouped.cumcount().to_numpy()[:, None] + 1)).to_numpy()

    def advance(self, settings: np.ndarray, sensors: np.ndarray, counts: np.ndarray | None,
                sums: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One more cycle of a unit, as the streaming predictor and the edge runtime see them.

        settings (1, 3), sensors (1, len(sensors_)); counts (regimes,) cycles run in each regime and
        sums (len(sensors_),) normalised sensors summed, over the unit's earlier cycles (None: this
        is its first). Returns (feature row (features,), counts, sums), both with this cycle.
        """
        counts = np.zeros(self.config.num_regimes) if counts is None else counts.copy()
        counts[self.regimes(settings)[0]] += 1
        sums = self.normalise(settings, sensors)[0] + (0.0 if sums is None else sums)
        row = self.transform_arrays(settings, sensors, counts[None], (sums / counts.sum())[None])[0]
        return row, counts, sums

    def normalised_sums(self, regime_sums: np.ndarray, regime_counts: np.ndarray) -> np.ndarray:
        """Sums of the normalised sensors from raw per-regime sums (the normalisation is affine in each regime).

        regime_sums: (..., regimes, len(sensors_)) raw readings summed over the cycles run in each
        regime; regime_counts: (..., regimes) those cycles -> (..., len(sensors_)).
        """
        regime_sums, regime_counts = np.asarray(regime_sums, np.float64), np.asarray(regime_counts, np.float64)
        return ((regime_sums - regime_counts[..., None] * self.mean_) / self.std_).sum(axis=-2)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        history = self.regime_history(frame) if self.config.history else None
        running = self.running_means(frame) if self.config.running_mean else None
        return self.transform_arrays(frame[SETTINGS].to_numpy(), frame[self.sensors_].to_numpy(), history, running)

    def state(self) -> dict[str, Any]:
        """Plain-JSON state, to save beside the model."""
        return {"config": asdict(self.config), "setting_scale": self.setting_scale_.tolist(),
                "centers": self.centers_.tolist(), "sensors": self.sensors_, "mean": self.mean_.tolist(),
                "std": [[s if np.isfinite(s) else None for s in row] for row in self.std_.tolist()],
                "trend": self.trend_}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ConditionNormalizer:
        self = cls(FeatureConfig(**state["config"]))
        self.setting_scale_ = np.asarray(state["setting_scale"])
        self.centers_ = np.asarray(state["centers"])
        self.sensors_ = list(state["sensors"])
        self.mean_ = np.asarray(state["mean"])
        self.std_ = np.asarray([[np.inf if s is None else s for s in row] for row in state["std"]])
        self.trend_ = state["trend"]
        return self


def _median_unit_trend(values: np.ndarray, units: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """Median over units of |Pearson corr(column, cycle)| inside each unit. values: (rows, C) -> (C,).

    Flat columns (zero variance in a unit) count as no trend.
    """
    _, unit_index = np.unique(units, return_inverse=True)
    count = np.bincount(unit_index).astype(np.float64)[:, None]  # (units, 1)

    def unit_sum(x: np.ndarray) -> np.ndarray:  # (rows, C) -> (units, C)
        return np.stack([np.bincount(unit_index, weights=col, minlength=len(count)) for col in x.T], axis=1)

    c = cycles.astype(np.float64)[:, None]
    dx = values - (unit_sum(values) / count)[unit_index]
    dc = c - (unit_sum(c) / count)[unit_index]
    covariance = unit_sum(dx * dc)
    scale = np.sqrt(unit_sum(dx**2) * unit_sum(dc**2))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(scale > 1e-12, np.abs(covariance) / scale, 0.0)
    return np.median(np.nan_to_num(corr), axis=0)
