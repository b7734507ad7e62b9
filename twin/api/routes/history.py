"""An asset's history over a time window (viewer), read after the rows still queued are committed."""

from __future__ import annotations

from fastapi import APIRouter, Query

from twin.api.deps import ApiContext, DeviceId
from twin.api.models.common import MAX_MS
from twin.api.models.history import HistoryRow
from twin.api.responses import NOT_FOUND
from twin.auth import Identity


def router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    service = ctx.service

    @router.get("/api/assets/{device_id}/history", summary="History of an asset over [start_ms, end_ms)",
                response_model=list[HistoryRow], responses=NOT_FOUND)
    def history(device_id: DeviceId, start_ms: int = Query(0, ge=0, le=MAX_MS),
                end_ms: int = Query(MAX_MS, ge=0, le=MAX_MS), limit: int = Query(1000, ge=1, le=100_000),
                latest: bool = Query(False, description="the newest `limit` rows instead of the oldest"),
                _: Identity = ctx.viewer) -> list[dict]:
        ctx.asset_or_404(device_id)
        service.store.flush()  # read your writes: rows still queued for the batch writer are committed first
        return service.store.history(device_id, start_ms=start_ms, end_ms=end_ms, limit=limit, latest=latest)

    return router
