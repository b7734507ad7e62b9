"""What-if simulation: run an asset forward under a changed plan, many times (Monte Carlo), and
report when and how it fails, with the spread.

Mills (AI4I 2020 type) follow the data's documented generator and failure rules: air temperature
a mean-reverting random walk with sd 2 K around its mean, process temperature air + 10 K with
sd 1 K, torque normal around its set point with sd 10 Nm and never negative, spindle power normal
around set-point torque x speed with the sd measured on the AI4I file (speed = power / torque, the
data's strong negative speed-torque correlation), tool wear +2/+3/+5 min per process for L/M/H,
and failures by the rules (TWF when the tool reaches its failure
point, drawn uniformly in 200-240 min; HDF; PWF; OSF; RNF 0.1% per process). A learned model can
replace the rules as the hazard. Engines project the RUL estimate under a changed duty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from twin.domain.health import ai4i_rule_flags

WEAR_PER_PROCESS = {"L": 2.0, "M": 3.0, "H": 5.0}  # min of tool wear per process, documented with AI4I 2020
MODES = ("TWF", "HDF", "PWF", "OSF", "RNF")
RAD_PER_S = 2 * np.pi / 60  # rpm -> rad/s
# A mill what-if costs ~55 us + 0.075 us x runs per process step on one core (measured: 480 steps of 20,000
# runs took 0.74 s, of 10 runs 0.03 s): steps x (runs + 1,000) <= 20M keeps the worst case near 1.5 s, so one
# request cannot hold a worker for minutes. The default plan (896 steps x 500 runs) uses 7% of it.
MAX_MILL_WORK = 20_000_000
MIN_PROCESSES_PER_HOUR = 0.01  # one process per 100 h; fewer made hours = steps / rate overflow to inf (found by
                               # schemathesis: 7e-170 processes per hour)


class SimulationError(ValueError):
    pass


@dataclass(frozen=True)
class MillPlan:
    speed_rpm: float | None = None          # spindle set point; None keeps the machine's latest speed
    torque_nm: float | None = None          # torque set point; None keeps the latest torque
    product_type: str | None = None         # L / M / H; None keeps the latest
    shifts_per_day: int = 2                 # 8-hour shifts; the machine idles the rest of the day
    processes_per_hour: float = 4.0         # a 15-minute process; set it to the plant's cycle time
    tool_change_min: float | None = None    # planned tool change at this wear; None runs the tool to failure
    horizon_hours: float = 24.0 * 14        # calendar hours to look ahead: two weeks of shifts
    power_sd_w: float = 1069.0              # spindle power sd, measured on the AI4I file (mean 6,278 W)
    runs: int = 500                         # Monte Carlo runs: ~0.1 s for two weeks of shifts
    seed: int = 0
    hazard: str = "rules"                   # "rules" (documented rules) or "model" (the learned AI4I model)

    def __post_init__(self):
        if self.product_type is not None and self.product_type not in WEAR_PER_PROCESS:
            raise SimulationError(f"product_type must be L, M or H, got {self.product_type!r}")
        if not 1 <= self.shifts_per_day <= 3:
            raise SimulationError(f"shifts_per_day must be 1, 2 or 3, got {self.shifts_per_day}")
        for name in ("processes_per_hour", "horizon_hours", "runs"):
            if not 0 < getattr(self, name) < float("inf"):
                raise SimulationError(f"{name} must be a positive finite number")
        if self.hazard not in ("rules", "model"):
            raise SimulationError(f"hazard must be 'rules' or 'model', got {self.hazard!r}")
        if self.processes_per_hour < MIN_PROCESSES_PER_HOUR:
            raise SimulationError(f"processes_per_hour must be at least {MIN_PROCESSES_PER_HOUR}")
        steps = self._steps()  # a float until it is known to be small: 1e308 processes must not overflow int()
        if steps * (self.runs + 1_000) > MAX_MILL_WORK:
            raise SimulationError(f"the plan needs {steps:,.0f} process steps x {self.runs:,} runs, more than one "
                                  "what-if may compute: shorten the horizon, or use fewer runs or processes per hour")

    def _steps(self) -> float:
        return float(np.ceil(self.horizon_hours / 24.0 * 8.0 * self.shifts_per_day * self.processes_per_hour))

    @property
    def process_steps(self) -> int:
        """Processes the machine runs in the horizon: one simulated step each."""
        return int(self._steps())


# (n, 6 columns) in AI4I order -> (failure probability (n,), mode probabilities (n, 5))
FailureModel = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


def simulate_mill(state: dict[str, Any], plan: MillPlan, *, model: FailureModel | None = None) -> dict[str, Any]:
    """Monte Carlo of a mill from its latest values (`state`: the twin's metric names)."""
    missing = [k for k in ("air_temperature", "process_temperature", "rotational_speed", "torque", "tool_wear")
               if not _finite(state.get(k))]
    if missing:
        raise SimulationError(f"the machine has no value yet for {', '.join(missing)} (or not a finite number)")
    if plan.hazard == "model" and model is None:
        raise SimulationError("hazard='model' needs the learned AI4I model, which is not loaded")
    rng = np.random.default_rng(plan.seed)
    n = plan.runs
    kind = plan.product_type or state.get("product_type") or "L"
    if kind not in WEAR_PER_PROCESS:
        raise SimulationError(f"the machine's product_type {str(kind)[:16]!r} is not L, M or H: pass product_type")
    op_hours_per_day = 8.0 * plan.shifts_per_day
    steps = plan.process_steps
    air_mean = float(state["air_temperature"])
    phi = 0.99  # per-process persistence of the air temperature walk
    air = np.full(n, air_mean)
    offset = np.full(n, float(state["process_temperature"]) - air_mean - 10.0)
    speed_sp = float(plan.speed_rpm if plan.speed_rpm is not None else state["rotational_speed"])
    torque_sp = float(plan.torque_nm if plan.torque_nm is not None else state["torque"])
    power_sp = torque_sp * speed_sp * RAD_PER_S
    wear = np.full(n, float(state["tool_wear"]))
    fail_at = rng.uniform(200.0, 240.0, n)
    failed_step = np.full(n, -1)
    failed_mode = np.full(n, "", dtype="<U3")
    tool_changes = np.zeros(n, dtype=int)
    alive = np.ones(n, dtype=bool)
    kinds = np.full(n, kind)
    for step in range(steps):
        air = air_mean + phi * (air - air_mean) + rng.normal(0, 2.0 * np.sqrt(1 - phi**2), n)
        offset = phi * offset + rng.normal(0, 1.0 * np.sqrt(1 - phi**2), n)
        process = air + 10.0 + offset
        torque = np.maximum(3.8, torque_sp + rng.normal(0, 10.0, n))  # 3.8 Nm: the data's minimum
        power = power_sp + rng.normal(0, plan.power_sd_w, n)
        speed = np.maximum(power, 1.0) / (torque * RAD_PER_S)
        if plan.tool_change_min is not None:
            change = alive & (wear >= plan.tool_change_min) & (wear < fail_at)
            wear[change], tool_changes[change] = 0.0, tool_changes[change] + 1
            fail_at[change] = rng.uniform(200.0, 240.0, int(change.sum()))
        wear = wear + WEAR_PER_PROCESS[kind]
        if plan.hazard == "rules":
            flags = ai4i_rule_flags(kinds, air, process, speed, torque, wear)
            flags["TWF"] = wear >= fail_at
            flags["RNF"] = rng.random(n) < 0.001
            hit = {mode: flags[mode] & alive for mode in MODES}
        else:
            prob, mode_probs = model({"Type": kinds, "Air temperature [K]": air, "Process temperature [K]": process,
                                      "Rotational speed [rpm]": speed, "Torque [Nm]": torque,
                                      "Tool wear [min]": wear})
            fails = alive & (rng.random(n) < prob)
            pick = np.asarray(MODES)[np.argmax(mode_probs, axis=1)]
            hit = {mode: fails & (pick == mode) for mode in MODES}
        for mode in MODES:  # the first mode in this order wins a tie, like the data's precedence
            new = hit[mode] & (failed_step < 0)
            failed_step[new], failed_mode[new] = step, mode
        alive &= failed_step < 0
        if not alive.any():
            break
    failed = failed_step >= 0
    op_hours = (failed_step[failed] + 1) / plan.processes_per_hour
    calendar_hours = np.floor(op_hours / op_hours_per_day) * 24.0 + np.mod(op_hours, op_hours_per_day)
    return {
        "kind": "mill", "plan": asdict(plan), "steps_simulated": steps,
        "failure_probability": float(failed.mean()),
        "time_to_failure_hours": _quantiles(calendar_hours),
        "operating_hours_to_failure": _quantiles(op_hours),
        "modes": {mode: float((failed_mode == mode).mean()) for mode in MODES},
        "most_likely_mode": max(MODES, key=lambda m: (failed_mode == m).sum()) if failed.any() else None,
        "tool_changes_mean": float(tool_changes.mean()),
        "start": {"air_temperature": air_mean, "tool_wear": float(state["tool_wear"]), "speed_rpm": speed_sp,
                  "torque_nm": torque_sp, "product_type": kind},
    }


@dataclass(frozen=True)
class EnginePlan:
    cycles_per_day: float = 4.0       # flights (cycles) per day under the new plan
    severity: float = 1.0             # wear per cycle relative to the duty so far (1.2: 20% harsher)
    rul_sd: float | None = None       # spread of the RUL estimate, cycles; None takes the model's own
    horizon_days: float = 60.0
    runs: int = 2000                  # cheap: one draw per run
    seed: int = 0

    def __post_init__(self):
        for name in ("cycles_per_day", "severity", "horizon_days", "runs"):
            if not 0 < getattr(self, name) < float("inf"):
                raise SimulationError(f"{name} must be a positive finite number")


def simulate_engine(rul: float | None, rul_sd: float | None, plan: EnginePlan) -> dict[str, Any]:
    """RUL (cycles) under a changed duty: the estimate's error drawn from N(0, sd), scaled by severity."""
    if rul is None or not _finite(rul):
        raise SimulationError("the engine has no RUL estimate yet")
    sd = plan.rul_sd if plan.rul_sd is not None else rul_sd
    if sd is None or not _finite(sd):
        raise SimulationError("the RUL model reports no error spread: pass rul_sd")
    rng = np.random.default_rng(plan.seed)
    cycles = np.maximum(0.0, rul + rng.normal(0.0, sd, plan.runs)) / plan.severity
    days_left = cycles / plan.cycles_per_day
    return {"kind": "engine", "plan": asdict(plan), "rul_now": rul, "rul_sd": sd,
            "rul_cycles": _quantiles(cycles), "days_to_failure": _quantiles(days_left),
            "failure_probability": float((days_left <= plan.horizon_days).mean())}


def _finite(value: Any) -> bool:
    """A number the simulation can start from (an int beyond float range or NaN/inf from a feed is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return bool(np.isfinite(float(value)))
    except OverflowError:
        return False


def _quantiles(x: np.ndarray) -> dict[str, float | None]:
    if x.size == 0:
        return {"p10": None, "p50": None, "p90": None, "mean": None, "n": 0}
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90), "mean": float(x.mean()), "n": int(x.size)}
