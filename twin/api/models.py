"""The request and response bodies of the twin's REST API (they are its OpenAPI schema).

Requests are bounded at the door: every number has a range that the simulation can compute
without overflow or an unbounded run time (422 otherwise). Responses are declared so that the
schema says what the API returns, and schemathesis checks it does (tests/twin/test_twin_api_fuzz.py);
floats a feed made NaN or infinite serialise as null, hence `float | None` where values come from
outside. Objects the other parts of the twin may grow (stats, dead letters) allow extra keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_MS = 2**62          # timestamps (ms since the epoch) the API accepts: far beyond any real date, inside BIGINT
MAX_SEED = 2**53 - 1    # the largest integer every JSON reader keeps exact (a float beyond it rounds: 2**63 ~ 9.2e18)
ID_MAX_LEN = 128        # asset, alarm and device ids (the plant's ids are short words)


# ------------------------------------------------------------------ requests
class MillPlanIn(BaseModel):
    """What-if for an AI4I-type mill. Omitted set points keep the machine's latest values."""
    model_config = ConfigDict(extra="forbid")
    # AI4I 2020 runs 1,168-2,886 rpm and 3.8-76.6 Nm; the bounds leave room for other mills and keep
    # power = torque x speed far from overflow
    speed_rpm: float | None = Field(None, gt=0, le=100_000)
    torque_nm: float | None = Field(None, ge=0, le=10_000)
    product_type: Literal["L", "M", "H"] | None = None
    shifts_per_day: int = Field(2, ge=1, le=3)
    # one process a minute at most, one per 100 h at least (twin.domain.whatif.MIN_PROCESSES_PER_HOUR); steps x runs
    # is bounded again by twin.domain.whatif.MAX_MILL_WORK
    processes_per_hour: float = Field(4.0, ge=0.01, le=60)
    tool_change_min: float | None = Field(None, gt=0, le=10_000)
    horizon_hours: float = Field(336.0, gt=0, le=24 * 365)
    runs: int = Field(500, ge=10, le=20_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    hazard: Literal["rules", "model"] = "rules"


class EnginePlanIn(BaseModel):
    """What-if for an engine: a new duty (cycles per day) and severity (wear per cycle vs. so far)."""
    model_config = ConfigDict(extra="forbid")
    # days = cycles / (severity x cycles_per_day): the lower bounds keep it finite for any RUL a model gives
    cycles_per_day: float = Field(4.0, ge=0.001, le=1_000)
    severity: float = Field(1.0, ge=0.01, le=100)
    rul_sd: float | None = Field(None, gt=0, le=100_000)
    horizon_days: float = Field(60.0, gt=0, le=3_650)
    runs: int = Field(2000, ge=10, le=200_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)


# ------------------------------------------------------------------ responses
class Identity(BaseModel):
    name: str
    role: Literal["viewer", "operator", "admin"]
    authenticated: bool = Field(description="false when the twin runs without --auth-file (loopback only)")


class Line(BaseModel):
    id: str
    name: str
    machines: list[str]


class PlantOut(BaseModel):
    site: str
    group: str
    lines: list[Line]


class HealthOut(BaseModel):
    rul: float | None
    rul_sd: float | None
    failure_prob: float | None
    mode: str | None
    mode_probs: dict[str, float | None]
    source: str


class AssetOut(BaseModel):
    id: str
    node: str
    line: str
    kind: str
    online: bool
    stale: bool
    last_seq: int
    data_ts: int | None
    messages: int
    values: dict[str, Any]
    health: HealthOut | None
    attributes: dict[str, Any]
    active_alarms: int
    node_online: bool


class SensorOut(BaseModel):
    name: str
    type: str
    unit: str
    min: float | None
    max: float | None
    deadband: float
    label: str


class NodeOut(BaseModel):
    id: str
    online: bool
    bd_seq: int | None
    metrics: dict[str, Any]


class AssetDetailOut(BaseModel):
    id: str
    node: NodeOut
    line: str
    kind: str
    online: bool
    stale: bool
    last_seq: int
    data_ts: int | None
    messages: int
    values: dict[str, Any]
    health: HealthOut | None
    attributes: dict[str, Any]
    sensors: list[SensorOut]


class HistoryRow(BaseModel):
    seq: int
    ts_ms: int
    received_ms: int
    in_order: bool
    rul: float | None
    failure_prob: float | None
    failure_mode: str | None
    values: dict[str, Any]


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


class Quantiles(BaseModel):
    p10: float | None
    p50: float | None
    p90: float | None
    mean: float | None
    n: int


class MillStart(BaseModel):
    air_temperature: float | None
    tool_wear: float | None
    speed_rpm: float | None
    torque_nm: float | None
    product_type: str


class MillResult(BaseModel):
    kind: Literal["mill"]
    plan: dict[str, Any]
    steps_simulated: int
    failure_probability: float
    time_to_failure_hours: Quantiles
    operating_hours_to_failure: Quantiles
    modes: dict[str, float]
    most_likely_mode: str | None
    tool_changes_mean: float
    start: MillStart


class EngineResult(BaseModel):
    kind: Literal["engine"]
    plan: dict[str, Any]
    rul_now: float
    rul_sd: float
    rul_cycles: Quantiles
    days_to_failure: Quantiles
    failure_probability: float


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


class Problem(BaseModel):
    """An error: what was wrong with the request, in one line."""
    detail: str
