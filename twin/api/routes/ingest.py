"""What the MQTT feed brought (viewer): ingestion counters, the messages the twin could not use, and
the JSON schema of the payloads."""

from __future__ import annotations

from fastapi import APIRouter, Query

from twin.api.deps import ApiContext
from twin.api.models.ingest import DeadLetterOut, StatsOut
from twin.auth import Identity
from twin.sparkplug.payload import PAYLOAD_SCHEMA


def router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    service = ctx.service

    @router.get("/api/stats", summary="Ingestion counters, latency, writer and MES status", response_model=StatsOut)
    def stats(_: Identity = ctx.viewer) -> dict:
        return service.stats()

    @router.get("/api/dead-letters", summary="Messages the twin could not use, with the reason",
                response_model=list[DeadLetterOut])
    def dead_letters(limit: int = Query(100, ge=1, le=10_000), _: Identity = ctx.viewer) -> list[dict]:
        service.store.flush()
        return service.store.dead_letters(limit=limit)

    @router.get("/api/schema", summary="JSON schema of the MQTT payloads")
    def schema(_: Identity = ctx.viewer) -> dict:
        return PAYLOAD_SCHEMA

    return router
