"""Rollouts as the API takes and shows them: the request (bundle, nodes, canary share, health gate) and
each rollout's and each edge node's state."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from twin.rollout.manager import MAX_TARGETS
from twin.rollout.protocol import HealthGate


class GateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int = Field(HealthGate.rows, ge=1, le=100_000, description="rows the new model scores under watch")
    max_drift: float = Field(HealthGate.max_drift, ge=0, le=1,
                             description="mean |p_new - p_previous| of the failure probability over the window")
    max_error_rate: float = Field(HealthGate.max_error_rate, ge=0, le=1)
    max_latency_ms: float = Field(HealthGate.max_latency_ms, ge=0, le=60_000,
                                  description="p95 scoring time (CPU ms a row)")


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(..., min_length=1, max_length=4096, description="the signed bundle's folder on the twin's host")
    nodes: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(..., min_length=1,
                                                                              max_length=MAX_TARGETS)
    canary: float = Field(0.1, gt=0, le=1, description="share of the nodes that take the model first")
    gate: GateIn = GateIn()


class GateOut(BaseModel):
    rows: int
    max_drift: float
    max_error_rate: float
    max_latency_ms: float


class RolloutNodeOut(BaseModel):
    node: str
    wave: Literal["canary", "rest"]
    state: str = Field(..., description="pending, offered, downloading, verifying, active, healthy, refused, "
                                        "rolled_back, aborted, skipped or timeout")
    reason: str | None
    version: str | None = Field(..., description="the node's active model, as it last reported")
    offered_ms: int | None
    sent_ms: int | None
    updated_ms: int


class RolloutOut(BaseModel):
    id: str
    created_ms: int
    created_by: str
    version: str
    sha256: str = Field(..., description="SHA-256 of the bundle's manifest.json")
    bytes: int
    canary_share: float
    gate: GateOut
    state: Literal["canary", "rolling", "completed", "partial", "failed", "aborted"]
    reason: str | None
    updated_ms: int
    counts: dict[str, int]
    nodes: list[RolloutNodeOut]


class EdgeModelOut(BaseModel):
    node: str
    online: bool
    model_version: str | None
    previous_version: str | None
    rollout_id: str | None
    rollout_state: str | None
    rollout_reason: str | None
