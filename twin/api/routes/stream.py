"""The live feed (viewer): server-sent events, a snapshot of assets and open alarms on every change."""

from __future__ import annotations

import asyncio
import json
import time

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from twin.api.deps import ApiContext
from twin.api.responses import PROBLEM_JSON
from twin.auth import Identity

# one event of the live feed (before OpenAPI 3.2's itemSchema, `schema` of an event stream describes one event)
SNAPSHOT_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "type": "object", "required": ["version", "assets", "alarms", "stats"], "properties": {
            "version": {"type": "integer"},
            "assets": {"type": "array", "items": {"$ref": "#/components/schemas/AssetOut"}},
            "alarms": {"type": "array", "items": {"$ref": "#/components/schemas/AlarmOut"}},
            "stats": {"$ref": "#/components/schemas/StatsOut"}}}}}}


def router(ctx: ApiContext, *, stream_max_s: float, max_streams: int) -> APIRouter:
    """`stream_max_s`: each stream ends after this long; browsers reconnect on their own.
    `max_streams`: streams open at once; more are refused with 503 (a wall of screens needs a few)."""
    router = APIRouter()
    service = ctx.service
    open_streams: set[object] = set()

    @router.get("/api/events", summary="Server-sent events: a snapshot of assets and open alarms on every change",
                response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {"schema": SNAPSHOT_EVENT}},
                                 "description": "`data: <snapshot JSON>` events"},
                           503: {"description": "Too many live streams open; retry later", "content": PROBLEM_JSON}})
    async def events(request: Request, _: Identity = ctx.viewer) -> StreamingResponse:
        # The dashboard reads this with fetch() and an Authorization header (EventSource cannot send one),
        # so the token never travels in a URL, where logs and browser history would keep it.
        if len(open_streams) >= max_streams:  # each stream snapshots the whole twin twice a second
            raise HTTPException(503, f"{max_streams} live streams are open; retry later",
                                headers={"Retry-After": "5"})

        async def stream():
            # counted from its first step: a body never iterated (client gone at once) is never counted
            marker = object()
            open_streams.add(marker)
            try:
                seen, started = -1, time.monotonic()
                while time.monotonic() - started < stream_max_s and not await request.is_disconnected():
                    if service.version != seen:
                        seen = service.version
                        snapshot = {"version": seen, "assets": service.assets(),
                                    "alarms": [a.to_dict() for a in service.open_alarms()],
                                    "stats": service.stats()}
                        yield f"data: {frame_json(snapshot)}\n\n"
                    await asyncio.sleep(0.5)  # at most two frames a second: plenty for people, cheap for the twin
            finally:
                open_streams.discard(marker)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return router


def frame_json(snapshot: dict) -> str:
    """JSON the browser's JSON.parse accepts: orjson writes NaN and infinities from a feed as null."""
    try:
        return orjson.dumps(snapshot).decode()
    except TypeError:  # an integer beyond 64 bits: the standard library writes it (as a number)
        return json.dumps(snapshot, default=str)
