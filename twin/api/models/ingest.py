"""What the MQTT feed brought: the twin's counters and the messages it could not use."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Latency(BaseModel):
    p50: float | None
    p99: float | None


class StatsOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    counters: dict[str, int]
    devices: int
    online: int
    committed: int
    write_errors: int
    mqtt_connected: bool
    work_orders_pending: int
    latency_ms: Latency


class DeadLetterOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    received_ms: int
    topic: str
    reason: str
