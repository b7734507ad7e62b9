"""Open alarms and alarm history (viewer); acknowledging one (operator)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query

from twin.api.deps import AlarmId, ApiContext
from twin.api.models.alarms import AlarmOut
from twin.api.models.common import ID_MAX_LEN, MAX_MS
from twin.api.responses import NOT_FOUND
from twin.auth import Identity


def router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    service = ctx.service

    @router.get("/api/alarms", summary="Open alarms (state=open) or alarm history (state=all)",
                response_model=list[AlarmOut])
    def alarms(state: Literal["open", "all"] = "open", device: str | None = Query(None, max_length=ID_MAX_LEN),
               since_ms: int = Query(0, ge=0, le=MAX_MS), limit: int = Query(500, ge=1, le=10_000),
               _: Identity = ctx.viewer) -> list[dict]:
        if state == "open":
            rows = [a for a in service.open_alarms() if device in (None, a.device)]
            return [a.to_dict() for a in sorted(rows, key=lambda a: -a.raised_ms)][:limit]
        service.store.flush()
        return [a.to_dict() for a in service.store.alarms(device=device, since_ms=since_ms, limit=limit)]

    @router.post("/api/alarms/{alarm_id}/ack",
                 summary="Acknowledge an alarm (operator): records who did, and their role",
                 response_model=AlarmOut, responses=NOT_FOUND)
    def acknowledge(alarm_id: AlarmId, identity: Identity = ctx.operator) -> dict:
        # who acknowledged is the token's holder, never a name the client writes in
        alarm = service.acknowledge(alarm_id, identity.name, identity.role)
        if alarm is None:
            raise HTTPException(404, f"no open, unacknowledged alarm {alarm_id!r}")
        return alarm.to_dict()

    return router
