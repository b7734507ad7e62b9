"""Sliding windows over each unit's cycles that never cross from one engine into the next.

Each unit's rows are stored with `window - 1` copies of its first row in front, so every cycle,
even one of an engine shorter than the window (test engines can have 19 cycles), owns a full
window: the padded rows stand for "no change before the record began". A window is a slice of
that padded array, gathered by index when a batch is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from manufacturing.maintenance.errors import MaintenanceDataError


@dataclass
class Windows:
    """Windows over padded per-unit rows.

    rows: (padded rows, features) float32; ends: (windows,) index in `rows` of each window's last
    row; unit: (windows,) unit id of each window; cycle_row: (windows,) row of the original frame.
    """

    rows: torch.Tensor
    ends: np.ndarray
    unit: np.ndarray
    cycle_row: np.ndarray
    window: int

    def __len__(self) -> int:
        return len(self.ends)

    def gather(self, index: np.ndarray | slice | None = None) -> torch.Tensor:
        """The windows at `index` as (batch, window, features)."""
        ends = self.ends if index is None else self.ends[index]
        offsets = np.arange(-self.window + 1, 1)
        return self.rows[torch.from_numpy(ends[:, None] + offsets[None, :])]


def build_windows(features: np.ndarray, units: np.ndarray, *, window: int, full_only: bool = True,
                  last_only: bool = False) -> Windows:
    """Windows ending at each cycle (or each unit's last cycle) of rows sorted by unit then cycle.

    features: (rows, F) float32; units: (rows,) unit id per row, rows of one unit contiguous.
    full_only: skip windows that would need padding, except a unit's last window when the unit is
    shorter than `window` (training uses real rows only; a short engine still gets one window).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(features) != len(units):
        raise ValueError(f"features and units must have the same rows, got {len(features)} and {len(units)}")
    boundaries = np.flatnonzero(np.diff(units) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [len(units)]])
    if len(np.unique(units[starts])) != len(starts):
        raise MaintenanceDataError("rows of each unit must be contiguous (sort by unit, cycle)", field="unit")
    pad = window - 1
    padded, ends, unit_of, rows_of = [], [], [], []
    offset = 0
    for start, stop in zip(starts, stops, strict=True):
        block = features[start:stop]
        padded.append(np.repeat(block[:1], pad, axis=0))
        padded.append(block)
        length = stop - start
        first = min(window, length) - 1 if full_only else 0
        cycles = np.arange(length - 1, length) if last_only else np.arange(first, length)
        ends.append(offset + pad + cycles)
        unit_of.append(np.full(len(cycles), units[start]))
        rows_of.append(start + cycles)
        offset += pad + length
    rows = torch.from_numpy(np.concatenate(padded).astype(np.float32))
    return Windows(rows, np.concatenate(ends), np.concatenate(unit_of), np.concatenate(rows_of), window)
