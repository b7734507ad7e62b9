"""One row of an asset's history."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class HistoryRow(BaseModel):
    seq: int
    ts_ms: int
    received_ms: int
    in_order: bool
    rul: float | None
    failure_prob: float | None
    failure_mode: str | None
    values: dict[str, Any]
