"""Work orders sent (or being sent) to the MES."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class WorkOrderOut(BaseModel):
    id: str
    device: str
    alarm_id: str | None
    created_ms: int
    body: dict[str, Any]
    status: str
    attempts: int
    last_error: str | None
    delivered_ms: int | None
