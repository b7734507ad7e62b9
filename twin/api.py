"""The twin's REST API (FastAPI; schema at /openapi.json, docs at /docs) and its live dashboard (/)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from twin.payload import PAYLOAD_SCHEMA
from twin.service import TwinService
from twin.simulate import EnginePlan, MillPlan, SimulationError

DASHBOARD = Path(__file__).with_name("dashboard.html")


class MillPlanIn(BaseModel):
    """What-if for an AI4I-type mill. Omitted set points keep the machine's latest values."""
    speed_rpm: float | None = Field(None, gt=0)
    torque_nm: float | None = Field(None, ge=0)
    product_type: Literal["L", "M", "H"] | None = None
    shifts_per_day: int = Field(2, ge=1, le=3)
    processes_per_hour: float = Field(4.0, gt=0)
    tool_change_min: float | None = Field(None, gt=0)
    horizon_hours: float = Field(336.0, gt=0, le=24 * 365)
    runs: int = Field(500, ge=10, le=20_000)
    seed: int = 0
    hazard: Literal["rules", "model"] = "rules"


class EnginePlanIn(BaseModel):
    """What-if for an engine: a new duty (cycles per day) and severity (wear per cycle vs. so far)."""
    cycles_per_day: float = Field(4.0, gt=0)
    severity: float = Field(1.0, gt=0)
    rul_sd: float | None = Field(None, gt=0)
    horizon_days: float = Field(60.0, gt=0)
    runs: int = Field(2000, ge=10, le=200_000)
    seed: int = 0


class AckIn(BaseModel):
    user: str = Field("operator", min_length=1, max_length=64)


def create_app(service: TwinService, *, stream_max_s: float = 600.0) -> FastAPI:
    """`stream_max_s`: each live-update stream ends after this long; browsers reconnect on their own."""
    app = FastAPI(title="moeworks digital twin", version="1",
                  description="Assets, live state, history, alarms and what-if simulation of a plant fed over "
                              "MQTT (Sparkplug-B-style topics, JSON payloads: see /api/schema).")

    def asset_or_404(device_id: str) -> dict:
        asset = service.asset(device_id)
        if asset is None:
            raise HTTPException(404, f"unknown asset {device_id!r}")
        return asset

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return DASHBOARD.read_text()

    @app.get("/api/plant", summary="The plant model: site, lines and their machines")
    def plant() -> dict:
        return service.plant.to_dict()

    @app.get("/api/assets", summary="Every asset with its live state and health")
    def assets() -> list[dict]:
        return service.assets()

    @app.get("/api/assets/{device_id}", summary="One asset: state, health, sensors with units and limits")
    def asset(device_id: str) -> dict:
        return asset_or_404(device_id)

    @app.get("/api/assets/{device_id}/history", summary="History of an asset over [start_ms, end_ms)")
    def history(device_id: str, start_ms: int = 0, end_ms: int = 2**62, limit: int = Query(1000, ge=1, le=100_000),
                latest: bool = Query(False, description="the newest `limit` rows instead of the oldest")) -> list[dict]:
        asset_or_404(device_id)
        service.store.flush()  # read your writes: rows still queued for the batch writer are committed first
        return service.store.history(device_id, start_ms=start_ms, end_ms=end_ms, limit=limit, latest=latest)

    @app.get("/api/alarms", summary="Open alarms (state=open) or alarm history (state=all)")
    def alarms(state: Literal["open", "all"] = "open", device: str | None = None, since_ms: int = 0,
               limit: int = Query(500, ge=1, le=10_000)) -> list[dict]:
        if state == "open":
            rows = [a for a in service.open_alarms() if device in (None, a.device)]
            return [a.to_dict() for a in sorted(rows, key=lambda a: -a.raised_ms)][:limit]
        service.store.flush()
        return [a.to_dict() for a in service.store.alarms(device=device, since_ms=since_ms, limit=limit)]

    @app.post("/api/alarms/{alarm_id}/ack", summary="Acknowledge an alarm")
    def acknowledge(alarm_id: str, body: AckIn) -> dict:
        alarm = service.acknowledge(alarm_id, body.user)
        if alarm is None:
            raise HTTPException(404, f"no open, unacknowledged alarm {alarm_id!r}")
        return alarm.to_dict()

    @app.post("/api/assets/{device_id}/simulate/mill", summary="What-if Monte Carlo for a mill")
    def simulate_mill(device_id: str, plan: MillPlanIn) -> dict:
        asset_or_404(device_id)
        try:
            return service.simulate(device_id, MillPlan(**plan.model_dump()))
        except SimulationError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.post("/api/assets/{device_id}/simulate/engine", summary="What-if RUL projection for an engine")
    def simulate_engine(device_id: str, plan: EnginePlanIn) -> dict:
        asset_or_404(device_id)
        try:
            return service.simulate(device_id, EnginePlan(**plan.model_dump()))
        except SimulationError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/api/stats", summary="Ingestion counters, latency, writer and MES status")
    def stats() -> dict:
        return service.stats()

    @app.get("/api/dead-letters", summary="Messages the twin could not use, with the reason")
    def dead_letters(limit: int = Query(100, ge=1, le=10_000)) -> list[dict]:
        service.store.flush()
        return service.store.dead_letters(limit=limit)

    @app.get("/api/work-orders", summary="Work orders sent (or being sent) to the MES")
    def work_orders() -> list[dict]:
        service.store.flush()
        return [vars(o) for o in service.store.work_orders()]

    @app.get("/api/schema", summary="JSON schema of the MQTT payloads")
    def schema() -> dict:
        return PAYLOAD_SCHEMA

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
    def metrics() -> str:
        s = service.stats()
        lines = [f'moeworks_twin_messages_total{{outcome="{k}"}} {v}' for k, v in sorted(s["counters"].items())]
        lines += [f"moeworks_twin_devices {s['devices']}", f"moeworks_twin_devices_online {s['online']}",
                  f"moeworks_twin_history_rows_total {s['committed']}",
                  f"moeworks_twin_write_errors_total {s['write_errors']}",
                  f"moeworks_twin_work_orders_pending {s['work_orders_pending']}"]
        for q in ("p50", "p99"):
            if s["latency_ms"][q] is not None:
                lines.append(f'moeworks_twin_latency_ms{{quantile="{q}"}} {s["latency_ms"][q]:.3f}')
        return "\n".join(lines) + "\n"

    @app.get("/api/events", summary="Server-sent events: a snapshot of assets and open alarms on every change")
    async def events(request: Request) -> StreamingResponse:
        async def stream():
            seen, started = -1, time.monotonic()
            while time.monotonic() - started < stream_max_s and not await request.is_disconnected():
                if service.version != seen:
                    seen = service.version
                    snapshot = {"version": seen, "assets": service.assets(),
                                "alarms": [a.to_dict() for a in service.open_alarms()], "stats": service.stats()}
                    yield f"data: {json.dumps(snapshot)}\n\n"
                await asyncio.sleep(0.5)  # at most two frames a second: plenty for people, cheap for the twin
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
