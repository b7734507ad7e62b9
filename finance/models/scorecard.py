"""The traditional model: a WoE-binned logistic scorecard with monotonic bins and PDO points.

Binning is optbinning's (optimal monotonic bins per feature, missing values in a bin of their own),
then a logistic regression on the WoE values. Hundreds of correlated aggregates are more than a
scorecard is built from: features are pre-screened by univariate AUC, then kept by information
value, as a scorecard analyst would.

Saved as data, never as a pickle: scorecard.json holds each selected feature's split points and
WoE per bin (the lookup tables scoring reads), its binning table (for the points table), and the
logistic coefficients. JSON floats are written as their shortest round-trip repr, so a reloaded
scorecard scores bit for bit as the fitted one (tests/test_no_code_on_load.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from optbinning import BinningProcess
from sklearn.linear_model import LogisticRegression

from finance.errors import CreditDataError
from finance.models.base import CreditModel, FitData, logistic_proba, register_model
from finance.scaling import PointsScale


@dataclass
class ScorecardConfig:
    max_candidates: int = 60  # strongest features by univariate AUC sent to binning (binning all 300+ is slow)
    min_iv: float = 0.02  # below 0.02 a feature is "not predictive" by the usual IV rule of thumb
    max_features: int = 25  # a scorecard a credit committee can read
    max_correlation: float = 0.8  # WoE correlation above which a feature is a near-duplicate
    max_n_bins: int = 6
    min_bin_size: float = 0.03  # each bin holds >= 3% of applicants: stable WoE
    regularisation_c: float = 0.5  # mild L2 on the WoE logistic regression

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"ScorecardConfig: {message}")

        for name in ("max_candidates", "max_features", "max_n_bins"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_n_bins < 2:
            fail(f"max_n_bins must be >= 2, got {self.max_n_bins}")
        if not 0 <= self.min_iv < 10:
            fail(f"min_iv must lie in [0, 10), got {self.min_iv!r}")
        if not 0 < self.max_correlation <= 1:
            fail(f"max_correlation must lie in (0, 1], got {self.max_correlation!r}")
        if not 0 < self.min_bin_size < 0.5:
            fail(f"min_bin_size must lie in (0, 0.5), got {self.min_bin_size!r}")
        if not self.regularisation_c > 0:
            fail(f"regularisation_c must be > 0, got {self.regularisation_c!r}")


SCORECARD_FILE = "scorecard.json"
SCORECARD_FORMAT = "moeworks-scorecard/2"  # /1 was scorecard.joblib (a pickle) beside a scorecard.json
MAX_SCORECARD_BYTES = 16 << 20  # 25 features of <= 6 bins are a few kB; 60 candidates a few tens


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} (every saved number is finite)")


def _finite_vector(values: Any, field_name: str, length: int | None) -> np.ndarray:
    """A list of finite numbers (of `length`, when given) as float64; ValueError naming the field."""
    if not isinstance(values, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"field {field_name!r} must be a list of numbers")
    array = np.asarray(values, dtype=np.float64)
    if length is not None and len(array) != length:
        raise ValueError(f"field {field_name!r} has {len(array)} numbers, expected {length}")
    if not np.isfinite(array).all():
        raise ValueError(f"field {field_name!r} holds a non-finite number")
    return array


def univariate_auc(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|AUC - 0.5| + 0.5 of each column alone (NaN -> median), by ranks, vectorised over columns."""
    from scipy.stats import rankdata

    filled = np.where(np.isnan(X), np.nanmedian(X, axis=0), X)
    ranks = rankdata(filled, axis=0)
    pos = y.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    auc = (ranks[pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.abs(np.nan_to_num(auc, nan=0.5) - 0.5) + 0.5


@register_model("scorecard")
class ScorecardModel(CreditModel):
    """WoE scorecard. contributions: log-odds above each feature's best bin (points lost / factor)."""

    config_class = ScorecardConfig
    uses_eval_set = False  # binning and the regression learn from the training rows alone

    def _fit(self, X: FitData, y: np.ndarray, sample_weight: np.ndarray | None, X_valid: FitData | None,
             y_valid: np.ndarray | None) -> None:
        c = self.config_
        rng = np.random.default_rng(self.seed)
        rows = rng.permutation(len(X))[:50_000]  # screening needs no more rows than this
        strength = univariate_auc(X.X[rows], y[rows])
        candidates = np.argsort(-strength)[: c.max_candidates]
        names = [self.features_[i] for i in candidates]
        frame = pd.DataFrame(X.X[:, candidates].astype(np.float64), columns=names)
        self.binning_ = BinningProcess(names, max_n_bins=c.max_n_bins, min_bin_size=c.min_bin_size,
                                       binning_fit_params={n: {"monotonic_trend": "auto_asc_desc"} for n in names})
        self.binning_.fit(frame, y, sample_weight=sample_weight)
        self.woe_tables_ = {name: self._woe_table(name) for name in names}
        summary = self.binning_.summary()
        information_value = dict(zip(summary["name"], summary["iv"].astype(float), strict=True))
        woe = self.binning_.transform(frame.iloc[rows], metric="woe")
        # Greedy by information value, skipping near-duplicates of features already in.
        chosen: list[str] = []
        for name in sorted(names, key=lambda n: -information_value[n]):
            # The strongest feature always enters: a scorecard needs one, even on data without signal.
            if chosen and (information_value[name] < c.min_iv or len(chosen) == c.max_features):
                break
            if not chosen or np.abs(woe[chosen].corrwith(woe[name])).max() < c.max_correlation:
                chosen.append(name)
        # WoE is high where risk is low, so every coefficient on the log-odds of default must be
        # negative; a positive one is collinearity, and that feature leaves (weakest first).
        while True:
            self.selected_ = chosen
            self.columns_ = [self.features_.index(n) for n in chosen]
            self.logistic_ = LogisticRegression(C=c.regularisation_c, max_iter=2000).fit(
                self._woe(X.X), y, sample_weight=sample_weight)
            wrong = [n for n, coef in zip(chosen, self.logistic_.coef_[0], strict=True) if coef >= 0]
            if not wrong or len(chosen) == 1:
                break
            chosen = [n for n in chosen if n != min(wrong, key=lambda n: information_value[n])]
        self.information_value_ = {n: information_value[n] for n in chosen}
        # The lowest-risk WoE contribution of each feature is the reference "full points" bin.
        self.best_contribution_ = np.array([
            min(self.logistic_.coef_[0][j] * w for w in self._bin_woes(name))
            for j, name in enumerate(self.selected_)])
        self.woe_tables_ = {name: self.woe_tables_[name] for name in self.selected_}
        self.bin_tables_ = {name: self._bin_table(name) for name in self.selected_}

    def _bin_table(self, name: str) -> list[dict[str, Any]]:
        """One feature's binning table (Totals row dropped) as JSON-ready rows; non-finite -> None."""
        table = self.binning_.get_binned_variable(name).binning_table.build().iloc[:-1]

        def number(value: Any) -> float | None:
            return float(value) if np.isfinite(float(value)) else None

        return [{"bin": str(row["Bin"]), "count": int(row["Count"]), "event_rate": number(row["Event rate"]),
                 "woe": number(row["WoE"]), "iv": number(row["IV"])} for _, row in table.iterrows()]

    def _bin_woes(self, name: str) -> list[float]:
        table = self.binning_.get_binned_variable(name).binning_table.build()
        return [float(w) for w in table["WoE"].iloc[:-1] if np.isfinite(float(w))]  # drop the Totals row

    def _woe_table(self, name: str) -> tuple[np.ndarray, np.ndarray, float]:
        """One feature's binning as a lookup table: (split points, WoE per bin, WoE of a missing value).

        The table is read off optbinning's own transform, one probe value per bin, so a lookup
        gives exactly its WoE values; optbinning's per-call bookkeeping (~40 us per feature per
        call) was most of a single application's time.
        """
        binned = self.binning_.get_binned_variable(name)
        assert binned.dtype == "numerical" and not binned.special_codes, f"{name}: only numerical bins, no specials"
        splits = np.asarray(binned.splits, dtype=np.float64)
        probes = np.concatenate([[-np.inf], splits, [np.nan]])  # bin 0, bins 1..len(splits), missing
        woe = binned.transform(probes, metric="woe")
        return splits, woe[:-1], float(woe[-1])

    def _woe(self, X: np.ndarray) -> np.ndarray:
        """(n, selected features) WoE values of the scorecard's features (optbinning's bins: a value
        equal to a split point falls in the bin above it)."""
        out = np.empty((len(X), len(self.selected_)))
        for j, (name, column) in enumerate(zip(self.selected_, self.columns_, strict=True)):
            splits, woe, missing = self.woe_tables_[name]
            x = X[:, column].astype(np.float64)
            out[:, j] = np.where(np.isnan(x), missing, woe[np.searchsorted(splits, x, side="right")])
        return out

    def predict_proba(self, X: FitData | np.ndarray) -> np.ndarray:
        data = self._input(X)
        return logistic_proba(self._woe(data.X), self.logistic_)

    def contributions(self, X: FitData | np.ndarray) -> np.ndarray:
        data = self._input(X)
        per_feature = self._woe(data.X) * self.logistic_.coef_[0] - self.best_contribution_  # (n, selected) >= 0
        out = np.zeros((len(data), len(self.features_)))
        out[:, self.columns_] = per_feature
        return out

    def scorecard_table(self, scale: PointsScale) -> pd.DataFrame:
        """feature, bin, count, event rate, WoE, IV and points per bin (points sum to the score)."""
        rows = []
        intercept_share = (scale.offset - scale.factor * self.logistic_.intercept_[0]) / len(self.selected_)
        for j, name in enumerate(self.selected_):
            for row in self.bin_tables_[name]:
                woe = 0.0 if row["woe"] is None else row["woe"]
                rows.append({"feature": name, "bin": row["bin"], "count": row["count"],
                             "event_rate": np.nan if row["event_rate"] is None else row["event_rate"], "woe": woe,
                             "iv": np.nan if row["iv"] is None else row["iv"],
                             "points": round(intercept_share - scale.factor * self.logistic_.coef_[0][j] * woe, 1)})
        return pd.DataFrame(rows)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "format": SCORECARD_FORMAT, "config": asdict(self.config_), "selected": self.selected_,
            "columns": self.columns_, "best_contribution": self.best_contribution_.tolist(),
            "logistic": {"coef": self.logistic_.coef_[0].tolist(), "intercept": float(self.logistic_.intercept_[0])},
            "information_value": self.information_value_,
            "bins": {name: {"splits": splits.tolist(), "woe": woe.tolist(), "missing_woe": missing}
                     for name, (splits, woe, missing) in self.woe_tables_.items()},
            "tables": self.bin_tables_,
        }
        # allow_nan=False: every number written is finite (a None stands for the non-finite table cells).
        (directory / SCORECARD_FILE).write_text(json.dumps(state, allow_nan=False))

    @classmethod
    def load(cls, directory: Path, *, feature_names: list[str], dataset: str) -> ScorecardModel:
        path = directory / SCORECARD_FILE
        if not path.is_file():
            raise CreditDataError(f"{path}: missing: not a scorecard model folder", field="model")
        if path.stat().st_size > MAX_SCORECARD_BYTES:
            raise CreditDataError(f"{path}: over {MAX_SCORECARD_BYTES >> 20} MiB: not a scorecard", field="model")
        try:
            state = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
            model = cls._restored(config=ScorecardConfig(**state["config"]), feature_names=feature_names,
                                  dataset=dataset)
            model._restore(state)
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                RecursionError) as error:
            if isinstance(error, CreditDataError):
                raise
            reason = f"field {error}" if isinstance(error, KeyError) else " ".join(str(error).split())[:200]
            raise CreditDataError(f"{path}: not a valid scorecard ({type(error).__name__}: {reason})",
                                  field="model") from None
        return model

    def _restore(self, state: dict[str, Any]) -> None:
        """The fitted state from scorecard.json, every field checked (a model file is outside input)."""
        if not isinstance(state, dict) or state.get("format") != SCORECARD_FORMAT:
            raise ValueError(f"field 'format' is not {SCORECARD_FORMAT!r} (saved by an older version, as a "
                             "pickle: retrain it)")
        selected, columns = state["selected"], state["columns"]
        if not (isinstance(selected, list) and selected and all(isinstance(n, str) for n in selected)
                and len(set(selected)) == len(selected)):
            raise ValueError("field 'selected' must be a non-empty list of distinct feature names")
        if columns != [self.features_.index(n) if n in self.features_ else -1 for n in selected]:
            raise ValueError("fields 'selected' and 'columns' do not match the model's feature pipeline")
        k = len(selected)
        coef = _finite_vector(state["logistic"]["coef"], "logistic.coef", k)
        intercept = _finite_vector([state["logistic"]["intercept"]], "logistic.intercept", 1)
        self.best_contribution_ = _finite_vector(state["best_contribution"], "best_contribution", k)
        bins, tables = state["bins"], state["tables"]
        if not (isinstance(bins, dict) and isinstance(tables, dict) and set(bins) == set(selected) == set(tables)):
            raise ValueError("fields 'bins' and 'tables' must hold exactly the selected features")
        self.woe_tables_ = {}
        for name in selected:
            splits = _finite_vector(bins[name]["splits"], f"bins.{name}.splits", None)
            if (np.diff(splits) <= 0).any():
                raise ValueError(f"field 'bins.{name}.splits' is not strictly increasing")
            woe = _finite_vector(bins[name]["woe"], f"bins.{name}.woe", len(splits) + 1)
            missing = float(_finite_vector([bins[name]["missing_woe"]], f"bins.{name}.missing_woe", 1)[0])
            self.woe_tables_[name] = (splits, woe, missing)
            columns_needed = {"bin", "count", "event_rate", "woe", "iv"}
            if not isinstance(tables[name], list) or not all(
                    isinstance(r, dict) and columns_needed <= set(r) for r in tables[name]):
                raise ValueError(f"field 'tables.{name}' must be a list of binning-table rows")
        self.bin_tables_ = tables
        self.selected_, self.columns_ = selected, columns
        self.information_value_ = {n: float(v) for n, v in state.get("information_value", {}).items()}
        # Only what scoring reads: the coefficients (finance.models.base.logistic_proba).
        logistic = LogisticRegression(C=self.config_.regularisation_c)
        logistic.classes_ = np.array([0, 1])
        logistic.coef_, logistic.intercept_ = coef[None, :], intercept
        logistic.n_features_in_ = k
        self.logistic_ = logistic

    def summary(self) -> dict[str, Any]:
        return {"features_in_scorecard": len(self.selected_)}
