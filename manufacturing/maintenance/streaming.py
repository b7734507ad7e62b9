"""RUL on live data: fed one cycle at a time per unit, keeps each unit's window, returns its RUL.

Used by the digital twin. Each cycle is a mapping of C-MAPSS field names to numbers:
`setting_1`, `setting_2`, `setting_3` and the model's sensors (`s_1`..`s_21`; the model's own
list is `required_fields`); other keys (`unit`, `cycle`, timestamps) are ignored, except that a
`cycle` that does not increase is refused. The estimate after a cycle equals the batch model's
prediction for a file holding the same unit's cycles so far (same normalisation, same padding of
short histories by repeating the first cycle, same network).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from manufacturing.maintenance.cmapss import SETTINGS
from manufacturing.maintenance.errors import MaintenanceDataError
from manufacturing.maintenance.rul import RULEstimator


@dataclass
class _UnitState:
    rows: deque  # normalised feature rows, at most `window`
    first: np.ndarray  # the unit's first normalised row: pads a history shorter than the window
    seen: int = 0
    history: np.ndarray | None = None  # (regimes,) cycles spent in each regime, for history features
    sums: np.ndarray | None = None  # (sensors,) normalised sensors summed over the unit's cycles, for running means
    last_cycle: float | None = None
    last_rul: float | None = field(default=None)


class StreamingRULPredictor:
    """Per-unit sliding windows over a trained RUL model.

    Args:
        estimator: a fitted RULEstimator (LSTM or MoE).
        min_cycles: cycles a unit must have sent before an estimate is returned (None before);
            1 answers from the first cycle, as the batch model does for a one-cycle test engine.
    update(unit_id, cycle) -> RUL in cycles (float) or None; `state(unit_id)` gives the window.
    """

    def __init__(self, estimator: RULEstimator, *, min_cycles: int = 1) -> None:
        if min_cycles < 1:
            raise ValueError(f"min_cycles must be >= 1, got {min_cycles}")
        self.estimator = estimator
        self.min_cycles = min_cycles
        self.window = estimator.net.window
        self.required_fields = [*SETTINGS, *estimator.normalizer_.sensors_]
        self._units: dict[str, _UnitState] = {}

    @classmethod
    def from_dir(cls, folder: str | Path, *, min_cycles: int = 1) -> StreamingRULPredictor:
        """Load the model saved by `moeworks maintenance train` (or RULEstimator.save) in `folder`."""
        return cls(RULEstimator.load(folder), min_cycles=min_cycles)

    @property
    def reads_whole_life(self) -> bool:
        """Whether an estimate depends on every cycle of the unit's life so far, not only the last
        `window` (regime history, running means): a unit's state is rebuilt from its whole life."""
        config = self.estimator.normalizer_.config
        return bool(config.history or config.running_mean)

    @property
    def units(self) -> list[str]:
        return list(self._units)

    def reset(self, unit_id: str | None = None) -> None:
        """Forget one unit (after maintenance: a new life starts) or, with None, every unit."""
        if unit_id is None:
            self._units.clear()
        else:
            self._units.pop(str(unit_id), None)

    def _row(self, unit_id: str, cycle: Mapping[str, float], number: int,
             state: _UnitState | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(normalised row, the unit's regime counts and normalised sensor sums with this cycle) for one
        incoming cycle, the `number`-th of the unit."""
        values = []
        for name in self.required_fields:
            if name not in cycle:
                raise MaintenanceDataError(f"missing; this model needs {', '.join(self.required_fields)}",
                                           source=f"unit {unit_id}", row=f"cycle {number}", field=name)
            try:
                value = float(cycle[name])
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise MaintenanceDataError(f"value {cycle[name]!r} is not a finite number",
                                           source=f"unit {unit_id}", row=f"cycle {number}", field=name)
            values.append(value)
        raw = np.asarray(values, dtype=np.float64)[None, :]
        history, sums = (None, None) if state is None else (state.history, state.sums)
        return self.estimator.normalizer_.advance(raw[:, :3], raw[:, 3:], history, sums)

    def update(self, unit_id: str, cycle: Mapping[str, float]) -> float | None:
        """Add one cycle of `unit_id` and return its current RUL estimate (None under min_cycles)."""
        unit_id = str(unit_id)
        state = self._units.get(unit_id)
        number = (state.seen if state else 0) + 1
        if "cycle" in cycle and state is not None and state.last_cycle is not None:
            if float(cycle["cycle"]) <= state.last_cycle:
                raise MaintenanceDataError(
                    f"cycle {cycle['cycle']} does not follow {state.last_cycle:g}; call reset() for a new life",
                    source=f"unit {unit_id}", row=f"cycle {number}", field="cycle")
        row, counts, sums = self._row(unit_id, cycle, number, state)
        if state is None:
            state = self._units[unit_id] = _UnitState(rows=deque(maxlen=self.window), first=row)
        state.rows.append(row)
        state.history, state.sums = counts, sums
        state.seen += 1
        if "cycle" in cycle:
            state.last_cycle = float(cycle["cycle"])
        if state.seen < self.min_cycles:
            return None
        rul = float(self.estimator.predict_windows(torch.from_numpy(self.state(unit_id))[None])[0])
        state.last_rul = rul
        return rul

    def state(self, unit_id: str) -> np.ndarray:
        """The unit's current model input: (window, features) float32, padded like the batch path."""
        state = self._units[str(unit_id)]
        rows = list(state.rows)
        padding = [state.first] * (self.window - len(rows))
        return np.stack(padding + rows).astype(np.float32)

    def last_estimate(self, unit_id: str) -> float | None:
        state = self._units.get(str(unit_id))
        return state.last_rul if state else None
