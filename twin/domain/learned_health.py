"""The learned predictive-maintenance models (manufacturing.maintenance) behind the twin's
HealthModel interface, and the AI4I model as the what-if simulation's hazard.

- Engines: `StreamingRULPredictor` fed each in-order cycle; RUL in cycles, with the model's
  validation RMSE as the spread the what-if simulation draws from.
- Mills: `AI4IFailureModel.predict_proba` on the latest row; failure probability and the five
  mode probabilities.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from twin.domain.health import AI4I_COLUMNS, MODES, Health, HealthModel, default_health_models
from twin.domain.plant import Machine

CMAPSS_FIELDS = {**{f"setting{i}": f"setting_{i}" for i in range(1, 4)},
                 **{f"s{i}": f"s_{i}" for i in range(1, 22)}, "cycle": "cycle"}  # twin metric -> model field


class StreamingRULHealth:
    def __init__(self, predictor, *, rul_sd: float | None = None):
        self.predictor = predictor
        self.rul_sd = rul_sd

    @classmethod
    def from_dir(cls, folder: str | Path) -> StreamingRULHealth:
        from manufacturing.maintenance.streaming import StreamingRULPredictor

        predictor = StreamingRULPredictor.from_dir(folder)
        metrics = predictor.estimator.metadata_.get("metrics", {})
        return cls(predictor, rul_sd=metrics.get("val_rmse"))

    @property
    def history_needed(self) -> int | None:
        """Stored cycles `warm` needs: the window, or every one (None) for features that read the whole life."""
        return None if self.predictor.reads_whole_life else self.predictor.window

    def warm(self, machine: Machine, history: list[dict[str, Any]]) -> Health | None:
        """Rebuild an engine's window from its stored cycles (oldest first), e.g. after the twin restarts:
        the next estimate then equals the one an uninterrupted twin would give."""
        health = None
        for values in history:
            health = self.update(machine, values) or health
        return health

    def update(self, machine: Machine, values: dict[str, Any]) -> Health | None:
        from manufacturing.maintenance.errors import MaintenanceDataError

        cycle = {field: values[name] for name, field in CMAPSS_FIELDS.items() if name in values}
        if any(f not in cycle for f in self.predictor.required_fields):
            return None  # the machine has not sent every sensor the model reads yet
        try:
            rul = self.predictor.update(machine.id, cycle)
        except MaintenanceDataError as exc:
            if exc.field != "cycle":
                return None  # a non-finite sensor value: no estimate rather than a wrong one
            self.predictor.reset(machine.id)  # the cycle counter went back: a new engine life (or replay)
            rul = self.predictor.update(machine.id, cycle)
        return Health(rul=rul, rul_sd=self.rul_sd, source="rul-model") if rul is not None else None


class AI4IModelHealth:
    """`min_interval_s`: a machine is scored at most this often (one call validates and scores a row
    in ~9 ms on this 2-core machine); in between, its last estimate stands."""

    def __init__(self, model, *, min_interval_s: float = 0.25):
        self.model = model
        self.min_interval_s = min_interval_s
        self._scored: dict[str, float] = {}

    @classmethod
    def from_dir(cls, folder: str | Path) -> AI4IModelHealth:
        from manufacturing.maintenance.ai4i import AI4IFailureModel

        return cls(AI4IFailureModel.load(folder))

    def update(self, machine: Machine, values: dict[str, Any]) -> Health | None:
        row = {column: values.get(name) for name, column in AI4I_COLUMNS.items()}
        if any(v is None for v in row.values()):
            return None
        now = time.monotonic()
        if now - self._scored.get(machine.id, -np.inf) < self.min_interval_s:
            return None
        self._scored[machine.id] = now
        probs = self.model.predict_proba(row).iloc[0]
        return Health(failure_prob=float(probs["failure"]), mode_probs={m: float(probs[m]) for m in MODES},
                      source="ai4i-model")

    def hazard(self, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The what-if simulation's FailureModel: (n,) failure probability and (n, 5) mode probabilities."""
        import pandas as pd

        probs = self.model.predict_proba(pd.DataFrame(rows))
        return probs["failure"].to_numpy(), probs[list(MODES)].to_numpy()


def learned_health_models(*, rul_model: str | Path | None = None,
                          ai4i_model: str | Path | None = None) -> tuple[dict[str, HealthModel], Any]:
    """Health models per machine kind (learned where a model folder is given, else the defaults)
    and the AI4I hazard for the what-if simulation (None without an AI4I model)."""
    models = default_health_models()
    hazard = None
    if rul_model is not None:
        models["engine"] = StreamingRULHealth.from_dir(rul_model)
    if ai4i_model is not None:
        ai4i = AI4IModelHealth.from_dir(ai4i_model)
        models["mill"], hazard = ai4i, ai4i.hazard
    return models, hazard
