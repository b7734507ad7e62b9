"""The twin's model of a plant: site -> line -> machine -> sensors, read from a YAML file.

A machine is a Sparkplug device (its id is the device id) published by one edge node. Machines
share sensor lists through templates, the way DTDL interfaces or Ditto features are reused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from twin.sparkplug.payload import DATATYPES

DEFAULT_PLANT = Path(__file__).with_name("plant.yaml")
KINDS = ("engine", "mill", "generic")


class PlantConfigError(ValueError):
    """A plant file the twin cannot use; the message names the file and the field."""


@dataclass(frozen=True)
class Sensor:
    name: str
    type: str = "Double"
    unit: str = ""
    min: float | None = None   # operating limits: a value outside raises a limit alarm
    max: float | None = None
    deadband: float = 0.0      # the value must come this far back inside before the alarm clears (no chatter)
    label: str = ""


@dataclass(frozen=True)
class Machine:
    id: str
    node: str
    line: str
    kind: str = "generic"
    sensors: dict[str, Sensor] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    stale_after_s: float = 10.0        # silence longer than this marks the machine stale
    rul_alarm_cycles: float = 30.0     # engines: a maintenance slot is needed this many cycles ahead
    failure_alarm_prob: float = 0.5    # mills: a coin-flip chance of failure is worth a work order


@dataclass(frozen=True)
class Line:
    id: str
    name: str
    machines: tuple[str, ...]


@dataclass(frozen=True)
class Plant:
    site: str
    group: str
    lines: tuple[Line, ...]
    machines: dict[str, Machine]

    # Computed once: the scale-out workers route every message by it (twin/scaleout/worker.py), and rebuilding
    # it over 1,000 machines per call was a fifth of a worker's CPU (benchmarks/RESULTS.md, "Twin scale-out").
    # Tuples, so no caller can change the shared value; a Plant is not changed after it is made.
    @functools.cached_property
    def nodes(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for machine in self.machines.values():
            out.setdefault(machine.node, []).append(machine.id)
        return {node: tuple(ids) for node, ids in out.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "group": self.group,
                "lines": [{"id": line.id, "name": line.name, "machines": list(line.machines)} for line in self.lines]}

    @classmethod
    def from_yaml(cls, path: str | Path = DEFAULT_PLANT) -> Plant:
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PlantConfigError(f"{path}: cannot read plant file: {exc}") from None
        return cls.from_dict(doc, source=str(path))

    @classmethod
    def from_dict(cls, doc: Any, *, source: str = "plant") -> Plant:
        def fail(where: str, why: str) -> PlantConfigError:
            return PlantConfigError(f"{source}: {where}: {why}")

        if not isinstance(doc, dict):
            raise fail("top level", "must be a mapping with site, group, lines")
        for key in ("site", "group", "lines"):
            if key not in doc:
                raise fail(key, "missing")
        templates = doc.get("templates") or {}
        machines: dict[str, Machine] = {}
        lines = []
        for li, line in enumerate(doc["lines"]):
            if not isinstance(line, dict) or "id" not in line:
                raise fail(f"lines[{li}]", "needs an id")
            ids = []
            for mi, spec in enumerate(line.get("machines") or []):
                where = f"lines[{li}].machines[{mi}]"
                if not isinstance(spec, dict) or "id" not in spec or "node" not in spec:
                    raise fail(where, "needs id and node")
                merged = dict(templates.get(spec["template"], {})) if "template" in spec else {}
                if "template" in spec and spec["template"] not in templates:
                    raise fail(f"{where}.template", f"unknown template {spec['template']!r}")
                merged.update({k: v for k, v in spec.items() if k != "template"})
                machine = _machine(merged, line["id"], lambda f, w, where=where: fail(f"{where}.{f}", w))
                if machine.id in machines:
                    raise fail(f"{where}.id", f"duplicate machine id {machine.id!r}")
                machines[machine.id] = machine
                ids.append(machine.id)
            lines.append(Line(line["id"], line.get("name", line["id"]), tuple(ids)))
        return cls(str(doc["site"]), str(doc["group"]), tuple(lines), machines)

    @classmethod
    def generated(cls, *, machines: int, nodes: int, group: str = "bench", kind: str = "mill") -> Plant:
        """A plant of `machines` identical AI4I-type machines spread over `nodes` edge nodes (benchmarks)."""
        template = yaml.safe_load(DEFAULT_PLANT.read_text())["templates"]["ai4i_mill" if kind == "mill" else
                                                                           "cmapss_engine"]
        specs = [dict(template, id=f"m{i:05d}", node=f"n{i % nodes:04d}") for i in range(machines)]
        return cls.from_dict({"site": "generated", "group": group,
                              "lines": [{"id": "line-1", "machines": specs}]}, source="generated")


def _machine(spec: dict[str, Any], line: str, fail) -> Machine:
    kind = spec.get("kind", "generic")
    if kind not in KINDS:
        raise fail("kind", f"must be one of {KINDS}, got {kind!r}")
    sensors = {}
    for si, raw in enumerate(spec.get("sensors") or []):
        if not isinstance(raw, dict) or "name" not in raw:
            raise fail(f"sensors[{si}]", "needs a name")
        if raw.get("type", "Double") not in DATATYPES:
            raise fail(f"sensors[{si}].type", f"must be one of {DATATYPES}")
        try:
            sensor = Sensor(**raw)
        except TypeError as exc:
            raise fail(f"sensors[{si}]", str(exc)) from None
        if sensor.min is not None and sensor.max is not None and sensor.min >= sensor.max:
            raise fail(f"sensors[{si}]", "min must be below max")
        sensors[sensor.name] = sensor
    numbers = {}
    for key in ("stale_after_s", "rul_alarm_cycles", "failure_alarm_prob"):
        if key in spec:
            try:
                numbers[key] = float(spec[key])
            except (TypeError, ValueError):
                raise fail(key, f"must be a number, got {spec[key]!r}") from None
    return Machine(id=str(spec["id"]), node=str(spec["node"]), line=line, kind=kind, sensors=sensors,
                   attributes=dict(spec.get("attributes") or {}), **numbers)
