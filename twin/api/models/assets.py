"""The plant and its assets: live state and health, one asset's sensors and node."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


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
    stale: bool = False   # a Sparkplug seq gap since the node's last NBIRTH (a rebirth was requested)
    metrics: dict[str, Any]


class AssetBase(BaseModel):
    """What the asset list and one asset's detail both say; `node` is the node's id in the list and
    the node itself (online, bdSeq, metrics) in the detail."""
    id: str
    node: str | NodeOut
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


class AssetOut(AssetBase):
    node: str
    active_alarms: int
    node_online: bool


class AssetDetailOut(AssetBase):
    node: NodeOut
    sensors: list[SensorOut]
