"""The twin's REST API (FastAPI; schema at /openapi.json, docs at /docs) and its live dashboard (/).

With a token store (`moeworks twin serve --auth-file`) every route under /api and /metrics needs a
bearer token: viewer reads (state, history, alarms, the live feed); operator acknowledges alarms and
runs what-ifs; admin (every right) starts and aborts model rollouts (twin.api.routes.rollouts, with `--rollout-key`)
and is what routes that change configuration, the MES or ETL will ask for. The dashboard page itself holds no
data: it asks for a token and sends it with each request. Without a store the twin serves loopback
only (twin.auth.check_bind) and every caller is the local admin.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer

from twin.api.models import (
    ID_MAX_LEN,
    MAX_MS,
    AlarmOut,
    AssetDetailOut,
    AssetOut,
    DeadLetterOut,
    EnginePlanIn,
    EngineResult,
    HistoryRow,
    MillPlanIn,
    MillResult,
    PlantOut,
    Problem,
    StatsOut,
    WorkOrderOut,
)
from twin.api.models import Identity as IdentityOut
from twin.auth import Identity, TokenStore, role_dependency
from twin.domain.whatif import EnginePlan, MillPlan, SimulationError
from twin.rollout.manager import RolloutManager
from twin.service import TwinService
from twin.sparkplug.payload import PAYLOAD_SCHEMA

DASHBOARD = Path(__file__).with_name("dashboard.html")

DeviceId = Annotated[str, PathParam(max_length=ID_MAX_LEN)]
AlarmId = Annotated[str, PathParam(max_length=ID_MAX_LEN)]
# a what-if the twin cannot run for this asset (no estimate yet, too large a plan) is a 422 with a one-line detail,
# next to FastAPI's own 422 for a body that does not fit the schema
UNPROCESSABLE = {422: {"description": "The request does not fit the schema, or the twin cannot run it",
                       "content": {"application/json": {"schema": {"anyOf": [
                           {"$ref": "#/components/schemas/HTTPValidationError"},
                           {"$ref": "#/components/schemas/Problem"}]}}}}}
NOT_FOUND = {404: {"model": Problem, "description": "No such asset or alarm"}}
# one event of the live feed (before OpenAPI 3.2's itemSchema, `schema` of an event stream describes one event)
SNAPSHOT_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "type": "object", "required": ["version", "assets", "alarms", "stats"], "properties": {
            "version": {"type": "integer"},
            "assets": {"type": "array", "items": {"$ref": "#/components/schemas/AssetOut"}},
            "alarms": {"type": "array", "items": {"$ref": "#/components/schemas/AlarmOut"}},
            "stats": {"$ref": "#/components/schemas/StatsOut"}}}}}}
PROBLEM_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
BAD_BODY = {400: {"model": Problem, "description": "The body is not JSON"}}


def create_app(service: TwinService, *, stream_max_s: float = 600.0, tokens: TokenStore | None = None,
               max_streams: int = 64, rollouts: RolloutManager | None = None) -> FastAPI:
    """`stream_max_s`: each live-update stream ends after this long; browsers reconnect on their own.
    `tokens`: require bearer tokens with roles (None: no authentication, for a loopback-only twin).
    `max_streams`: live streams open at once; more are refused with 503 (a wall of screens needs a few).
    `rollouts`: serve /api/rollouts and /api/edge-models (twin.api.routes.rollouts)."""
    open_streams: set[object] = set()
    app = FastAPI(title="moeworks digital twin", version="1",
                  description="Assets, live state, history, alarms and what-if simulation of a plant fed over "
                              "MQTT (Sparkplug-B-style topics, JSON payloads: see /api/schema)."
                              + (" Every route needs `Authorization: Bearer <token>` (`moeworks auth token`)."
                                 if tokens else ""))
    viewer = Depends(role_dependency(tokens, "viewer"))
    operator = Depends(role_dependency(tokens, "operator"))
    # HTTPBearer only documents the scheme in the OpenAPI schema (/docs gets its Authorize button);
    # role_dependency decides. auto_error=False: its 403 for a missing header would hide our 401.
    documented = [Depends(HTTPBearer(auto_error=False))] if tokens else []
    # refusals are JSON on every route, /metrics' text and the event stream included
    refusals = ({401: {"description": "No valid bearer token", "content": PROBLEM_JSON},
                 403: {"description": "The token's role may not do this", "content": PROBLEM_JSON}} if tokens else {})
    api = APIRouter(dependencies=documented, responses=refusals)

    def asset_or_404(device_id: str) -> dict:
        asset = service.asset(device_id)
        if asset is None:
            raise HTTPException(404, f"unknown asset {device_id[:ID_MAX_LEN]!r}")
        return asset

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return DASHBOARD.read_text()

    @api.get("/api/whoami", summary="Who the presented token belongs to, and its role", response_model=IdentityOut)
    def whoami(identity: Identity = viewer) -> dict:
        return {"name": identity.name, "role": identity.role, "authenticated": tokens is not None}

    @api.get("/api/plant", summary="The plant model: site, lines and their machines", response_model=PlantOut)
    def plant(_: Identity = viewer) -> dict:
        return service.plant.to_dict()

    @api.get("/api/assets", summary="Every asset with its live state and health", response_model=list[AssetOut])
    def assets(_: Identity = viewer) -> list[dict]:
        return service.assets()

    @api.get("/api/assets/{device_id}", summary="One asset: state, health, sensors with units and limits",
             response_model=AssetDetailOut, responses=NOT_FOUND)
    def asset(device_id: DeviceId, _: Identity = viewer) -> dict:
        return asset_or_404(device_id)

    @api.get("/api/assets/{device_id}/history", summary="History of an asset over [start_ms, end_ms)",
             response_model=list[HistoryRow], responses=NOT_FOUND)
    def history(device_id: DeviceId, start_ms: int = Query(0, ge=0, le=MAX_MS),
                end_ms: int = Query(MAX_MS, ge=0, le=MAX_MS), limit: int = Query(1000, ge=1, le=100_000),
                latest: bool = Query(False, description="the newest `limit` rows instead of the oldest"),
                _: Identity = viewer) -> list[dict]:
        asset_or_404(device_id)
        service.store.flush()  # read your writes: rows still queued for the batch writer are committed first
        return service.store.history(device_id, start_ms=start_ms, end_ms=end_ms, limit=limit, latest=latest)

    @api.get("/api/alarms", summary="Open alarms (state=open) or alarm history (state=all)",
             response_model=list[AlarmOut])
    def alarms(state: Literal["open", "all"] = "open", device: str | None = Query(None, max_length=ID_MAX_LEN),
               since_ms: int = Query(0, ge=0, le=MAX_MS), limit: int = Query(500, ge=1, le=10_000),
               _: Identity = viewer) -> list[dict]:
        if state == "open":
            rows = [a for a in service.open_alarms() if device in (None, a.device)]
            return [a.to_dict() for a in sorted(rows, key=lambda a: -a.raised_ms)][:limit]
        service.store.flush()
        return [a.to_dict() for a in service.store.alarms(device=device, since_ms=since_ms, limit=limit)]

    @api.post("/api/alarms/{alarm_id}/ack", summary="Acknowledge an alarm (operator): records who did, and their role",
              response_model=AlarmOut, responses=NOT_FOUND)
    def acknowledge(alarm_id: AlarmId, identity: Identity = operator) -> dict:
        # who acknowledged is the token's holder, never a name the client writes in
        alarm = service.acknowledge(alarm_id, identity.name, identity.role)
        if alarm is None:
            raise HTTPException(404, f"no open, unacknowledged alarm {alarm_id!r}")
        return alarm.to_dict()

    @api.post("/api/assets/{device_id}/simulate/mill", summary="What-if Monte Carlo for a mill (operator)",
              response_model=MillResult, responses=NOT_FOUND | UNPROCESSABLE | BAD_BODY)
    def simulate_mill(device_id: DeviceId, plan: MillPlanIn, _: Identity = operator) -> dict:
        asset_or_404(device_id)
        try:
            return service.simulate(device_id, MillPlan(**plan.model_dump()))
        except SimulationError as exc:
            raise HTTPException(422, str(exc)) from None

    @api.post("/api/assets/{device_id}/simulate/engine", summary="What-if RUL projection for an engine (operator)",
              response_model=EngineResult, responses=NOT_FOUND | UNPROCESSABLE | BAD_BODY)
    def simulate_engine(device_id: DeviceId, plan: EnginePlanIn, _: Identity = operator) -> dict:
        asset_or_404(device_id)
        try:
            return service.simulate(device_id, EnginePlan(**plan.model_dump()))
        except SimulationError as exc:
            raise HTTPException(422, str(exc)) from None

    @api.get("/api/stats", summary="Ingestion counters, latency, writer and MES status", response_model=StatsOut)
    def stats(_: Identity = viewer) -> dict:
        return service.stats()

    @api.get("/api/dead-letters", summary="Messages the twin could not use, with the reason",
             response_model=list[DeadLetterOut])
    def dead_letters(limit: int = Query(100, ge=1, le=10_000), _: Identity = viewer) -> list[dict]:
        service.store.flush()
        return service.store.dead_letters(limit=limit)

    @api.get("/api/work-orders", summary="Work orders sent (or being sent) to the MES",
             response_model=list[WorkOrderOut])
    def work_orders(_: Identity = viewer) -> list[dict]:
        service.store.flush()
        return [vars(o) for o in service.store.work_orders()]

    @api.get("/api/schema", summary="JSON schema of the MQTT payloads")
    def schema(_: Identity = viewer) -> dict:
        return PAYLOAD_SCHEMA

    @api.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
    def metrics(_: Identity = viewer) -> str:
        s = service.stats()
        lines = [f'moeworks_twin_messages_total{{outcome="{k}"}} {v}' for k, v in sorted(s["counters"].items())]
        lines += [f"moeworks_twin_devices {s['devices']}", f"moeworks_twin_devices_online {s['online']}",
                  f"moeworks_twin_history_rows_total {s['committed']}",
                  f"moeworks_twin_write_errors_total {s['write_errors']}",
                  f"moeworks_twin_rows_refused_total {s['rows_refused']}",   # rows the database refused
                  f"moeworks_twin_health_backlog {s['health_backlog']}",     # scorings queued for the models
                  f"moeworks_twin_work_orders_pending {s['work_orders_pending']}"]
        for q in ("p50", "p99"):
            if s["latency_ms"][q] is not None:
                lines.append(f'moeworks_twin_latency_ms{{quantile="{q}"}} {s["latency_ms"][q]:.3f}')
        return "\n".join(lines) + "\n"

    @api.get("/api/events", summary="Server-sent events: a snapshot of assets and open alarms on every change",
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {"schema": SNAPSHOT_EVENT}},
                              "description": "`data: <snapshot JSON>` events"},
                        503: {"description": "Too many live streams open; retry later", "content": PROBLEM_JSON}})
    async def events(request: Request, _: Identity = viewer) -> StreamingResponse:
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
                        yield f"data: {_frame_json(snapshot)}\n\n"
                    await asyncio.sleep(0.5)  # at most two frames a second: plenty for people, cheap for the twin
            finally:
                open_streams.discard(marker)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.include_router(api)
    if rollouts is not None:
        from twin.api.routes.rollouts import rollout_router

        app.include_router(rollout_router(rollouts, tokens), dependencies=documented, responses=refusals)
    return app


def _frame_json(snapshot: dict) -> str:
    """JSON the browser's JSON.parse accepts: orjson writes NaN and infinities from a feed as null."""
    try:
        return orjson.dumps(snapshot).decode()
    except TypeError:  # an integer beyond 64 bits: the standard library writes it (as a number)
        return json.dumps(snapshot, default=str)
