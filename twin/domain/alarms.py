"""Alarms with the ISA-18.2 life cycle: raised once, cleared when the condition ends, acknowledged
by a person; every occurrence is a row of history.

    ACTIVE_UNACK --ack--> ACTIVE_ACK --clear--> CLOSED
    ACTIVE_UNACK --clear--> CLEARED_UNACK --ack--> CLOSED

A condition that returns while its previous occurrence is cleared but unacknowledged makes that
occurrence active again (no flood of rows); after it closed, it raises a new one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from twin.domain.state import DeviceState

SEVERITY = {"offline": "high", "stale": "medium", "limit_high": "medium", "limit_low": "medium",
            "rul_low": "high", "failure_risk": "high"}
MAINTENANCE_KINDS = ("rul_low", "failure_risk")  # these ask the MES for a work order
AlarmState = Literal["ACTIVE_UNACK", "ACTIVE_ACK", "CLEARED_UNACK", "CLOSED"]


@dataclass
class Alarm:
    id: str
    device: str
    kind: str
    metric: str
    severity: str
    message: str
    value: float | None
    raised_ms: int
    cleared_ms: int | None = None
    acked_ms: int | None = None
    acked_by: str | None = None     # the authenticated name of who acknowledged (a token's name)
    acked_role: str | None = None   # and the role that token held then

    @property
    def state(self) -> AlarmState:
        if self.cleared_ms is None:
            return "ACTIVE_ACK" if self.acked_ms is not None else "ACTIVE_UNACK"
        return "CLOSED" if self.acked_ms is not None else "CLEARED_UNACK"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"state": self.state}


def _active(mine: dict[tuple[str, str], Alarm], kind: str, metric: str) -> bool:
    alarm = mine.get((kind, metric))
    return alarm is not None and alarm.cleared_ms is None


class AlarmManager:
    """Evaluates a device's conditions after each change; returns the alarms whose rows changed."""

    def __init__(self) -> None:
        self.open: dict[str, dict[tuple[str, str], Alarm]] = {}  # device -> (kind, metric) -> not yet CLOSED
        self.by_id: dict[str, Alarm] = {}
        self._limited: dict[str, list] = {}                 # machine -> its sensors with limits (the hot path)

    def load(self, alarms: Iterable[Alarm]) -> None:
        """Resume the open alarms found in history after a restart."""
        for alarm in alarms:
            if alarm.state != "CLOSED":
                self.open.setdefault(alarm.device, {})[(alarm.kind, alarm.metric)] = alarm
                self.by_id[alarm.id] = alarm

    def evaluate(self, device: DeviceState, now_ms: int) -> list[Alarm]:
        machine = device.machine
        mine = self.open.get(machine.id, {})
        active: dict[tuple[str, str], tuple[str, float | None]] = {}  # (kind, metric) -> (message, value)
        if device.ever_online and not device.online:
            active[("offline", "")] = (f"{machine.id} is offline (death certificate)", None)
        if device.online and device.stale:
            active[("stale", "")] = (f"no data from {machine.id} for over {machine.stale_after_s:g} s", None)
        limited = self._limited.get(machine.id)
        if limited is None:
            limited = self._limited[machine.id] = [(n, s) for n, s in machine.sensors.items()
                                                   if s.max is not None or s.min is not None]
        values = device.values
        for name, sensor in limited:
            value = values.get(name)
            if type(value) is not float and type(value) is not int:
                continue
            high, low = sensor.max, sensor.min
            # beyond the limit raises; an active alarm holds until the value is back past the deadband
            if high is not None and (value > high or (value > high - sensor.deadband
                                                      and _active(mine, "limit_high", name))):
                active[("limit_high", name)] = (f"{name} = {value:g} {sensor.unit} above max {high:g}", float(value))
            if low is not None and (value < low or (value < low + sensor.deadband
                                                    and _active(mine, "limit_low", name))):
                active[("limit_low", name)] = (f"{name} = {value:g} {sensor.unit} below min {low:g}", float(value))
        health = device.health
        if health is not None and health.rul is not None and health.rul < machine.rul_alarm_cycles:
            active[("rul_low", "rul")] = (f"RUL {health.rul:.0f} cycles < {machine.rul_alarm_cycles:g}", health.rul)
        if health is not None and health.failure_prob is not None and health.failure_prob > machine.failure_alarm_prob:
            active[("failure_risk", "failure_prob")] = (
                f"failure probability {health.failure_prob:.2f} > {machine.failure_alarm_prob:g}"
                f" (most likely {health.mode})", health.failure_prob)
        return self._reconcile(machine.id, active, now_ms)

    def _reconcile(self, device: str, active: dict[tuple[str, str], tuple[str, float | None]],
                   now_ms: int) -> list[Alarm]:
        changed = []
        mine = self.open.setdefault(device, {})
        for (kind, metric), (message, value) in active.items():
            alarm = mine.get((kind, metric))
            if alarm is None:
                alarm = Alarm(uuid.uuid4().hex[:16], device, kind, metric, SEVERITY[kind], message, value, now_ms)
                mine[(kind, metric)] = self.by_id[alarm.id] = alarm
                changed.append(alarm)
            elif alarm.cleared_ms is not None:
                alarm.cleared_ms, alarm.message, alarm.value = None, message, value
                changed.append(alarm)
        for key, alarm in list(mine.items()):
            if key not in active and alarm.cleared_ms is None:
                alarm.cleared_ms = now_ms
                changed.append(alarm)
                self._close_if_done(alarm)
        return changed

    def all_open(self) -> list[Alarm]:
        return [alarm for alarms in self.open.values() for alarm in alarms.values()]

    def acknowledge(self, alarm_id: str, *, user: str, now_ms: int, role: str | None = None) -> Alarm | None:
        alarm = self.by_id.get(alarm_id)
        if alarm is None or alarm.acked_ms is not None:
            return None
        alarm.acked_ms, alarm.acked_by, alarm.acked_role = now_ms, user, role
        self._close_if_done(alarm)
        return alarm

    def _close_if_done(self, alarm: Alarm) -> None:
        if alarm.state == "CLOSED":
            self.open.get(alarm.device, {}).pop((alarm.kind, alarm.metric), None)
            self.by_id.pop(alarm.id, None)
