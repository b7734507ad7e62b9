"""An alarm occurrence with its ISA-18.2 state."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class AlarmOut(BaseModel):
    id: str
    device: str
    kind: str
    metric: str
    severity: str
    message: str
    value: float | None
    raised_ms: int
    cleared_ms: int | None
    acked_ms: int | None
    acked_by: str | None
    acked_role: str | None = None
    state: Literal["ACTIVE_UNACK", "ACTIVE_ACK", "CLEARED_UNACK", "CLOSED"]
