"""Work orders the twin sent (or is sending) to the MES (viewer)."""

from __future__ import annotations

from fastapi import APIRouter

from twin.api.deps import ApiContext
from twin.api.models.mes import WorkOrderOut
from twin.auth import Identity


def router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    service = ctx.service

    @router.get("/api/work-orders", summary="Work orders sent (or being sent) to the MES",
                response_model=list[WorkOrderOut])
    def work_orders(_: Identity = ctx.viewer) -> list[dict]:
        service.store.flush()
        return [vars(o) for o in service.store.work_orders()]

    return router
