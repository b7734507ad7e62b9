"""Validation on training engines: split by unit, then cut each validation engine at a random cycle.

The official test files are run-to-failure trajectories stopped at a random point, scored on
their last cycle; this rebuilds that from training engines, which are never seen in training.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from manufacturing.maintenance.errors import MaintenanceDataError


def split_units(units: np.ndarray, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle the distinct unit ids and return (train units, validation units), both sorted."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    distinct = np.unique(units)
    if len(distinct) < 2:
        raise MaintenanceDataError(f"need at least two units to split, got {len(distinct)}", field="unit")
    order = np.random.default_rng(seed).permutation(distinct)
    n_val = max(1, round(val_fraction * len(distinct)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def truncate_units(frame: pd.DataFrame, *, seed: int = 0, min_cycles: int = 20,
                   cuts_per_unit: int = 1) -> tuple[pd.DataFrame, np.ndarray]:
    """Cut each run-to-failure unit at a random cycle, like the official test set.

    The kept length is uniform in [min(min_cycles, life - 1), life - 1], so at least one cycle is
    cut and the true RUL is >= 1 (the official test RULs start at 6 with a mean near 75-85; the
    shortest official test engines keep 19-38 cycles). With `cuts_per_unit` > 1 each engine is cut
    several times, each copy a new unit id (`unit * 1000 + k`), to average out the draw.
    Returns (test-like frame with `unit`, `cycle`, ... and a `source_unit` column,
    true RUL per new unit in sorted unit order).
    """
    rng = np.random.default_rng(seed)
    pieces, truth = [], []
    for unit, rows in frame.groupby("unit", sort=True):
        life = len(rows)
        if life < 2:
            raise MaintenanceDataError(f"unit {unit} has {life} cycle(s); cannot cut a run-to-failure trajectory",
                                       field="unit", row=str(unit))
        for k in range(cuts_per_unit):
            keep = int(rng.integers(min(min_cycles, life - 1), life))  # in [lo, life - 1]
            piece = rows.iloc[:keep].copy()
            piece["source_unit"] = unit
            if cuts_per_unit > 1:
                piece["unit"] = unit * 1000 + k
            pieces.append(piece)
            truth.append((piece["unit"].iloc[0], life - keep))
    truth.sort()
    out = pd.concat(pieces, ignore_index=True).sort_values(["unit", "cycle"], kind="stable").reset_index(drop=True)
    return out, np.array([rul for _, rul in truth], dtype=np.float64)
