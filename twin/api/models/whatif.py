"""What-if plans (bounded so the simulation can compute them) and their results."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from twin.api.models.common import MAX_SEED


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
