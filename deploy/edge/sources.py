"""What an edge device publishes: a replay of real data (a C-MAPSS engine cycle by cycle, AI4I
2020 rows in UDI order) or a simulated machine when no data is at hand (said so in its birth).

Each source has `metrics` (name, Sparkplug datatype, unit: what the DBIRTH declares) and yields
one dict of metric values per tick.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from twin.sparkplug.payload import Metric

CMAPSS_COLUMNS = ["unit", "cycle", "setting1", "setting2", "setting3"] + [f"s{i}" for i in range(1, 22)]
CMAPSS_UNITS = {"cycle": "cycle", "setting1": "altitude", "setting2": "Mach", "setting3": "TRA",
                **{f"s{i}": u for i, u in zip(range(1, 22), ["degR", "degR", "degR", "degR", "psia", "psia", "psia",
                                                               "rpm", "rpm", "ratio", "psia", "pps/psi", "rpm", "rpm",
                                                               "ratio", "ratio", "count", "rpm", "rpm", "lbm/s",
                                                               "lbm/s"], strict=True)}}
AI4I_METRICS = [Metric("product_type", type="String", unit=""), Metric("air_temperature", type="Double", unit="K"),
                Metric("process_temperature", type="Double", unit="K"),
                Metric("rotational_speed", type="Double", unit="rpm"), Metric("torque", type="Double", unit="Nm"),
                Metric("tool_wear", type="Double", unit="min")]


class SourceError(ValueError):
    """Bad replay input; the message names the file and what is wrong."""


def _engine_metrics() -> list[Metric]:
    return [Metric(name, type="Int64" if name == "cycle" else "Double", unit=unit)
            for name, unit in CMAPSS_UNITS.items()]


class CmapssReplay:
    """One engine (unit) of a C-MAPSS file, cycle by cycle."""

    def __init__(self, path: str | Path, *, unit: int):
        import pandas as pd

        path = Path(path)
        try:
            frame = pd.read_csv(path, sep=r"\s+", header=None)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path}: cannot read C-MAPSS file: {exc}") from None
        if frame.shape[1] != 26:
            raise SourceError(f"{path}: expected 26 columns (unit, cycle, 3 settings, 21 sensors), "
                              f"got {frame.shape[1]}")
        frame.columns = CMAPSS_COLUMNS
        self.rows = frame[frame["unit"] == unit].sort_values("cycle")
        if self.rows.empty:
            raise SourceError(f"{path}: no rows for unit {unit} (units {frame['unit'].min()}-{frame['unit'].max()})")
        self.metrics = _engine_metrics()
        self.description = f"C-MAPSS replay {path.name} unit {unit}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self.rows.itertuples(index=False):
            values = row._asdict()
            values.pop("unit")
            values["cycle"] = int(values["cycle"])
            yield {k: (v if k == "cycle" else float(v)) for k, v in values.items()}


class AI4IReplay:
    """AI4I 2020 rows in UDI order from `start_row`, one process per tick."""

    def __init__(self, path: str | Path, *, start_row: int = 0, rows: int | None = None):
        import pandas as pd

        path = Path(path)
        try:
            frame = pd.read_csv(path, encoding="utf-8-sig")
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path}: cannot read AI4I file: {exc}") from None
        needed = ["UDI", "Type", "Air temperature [K]", "Process temperature [K]", "Rotational speed [rpm]",
                  "Torque [Nm]", "Tool wear [min]"]
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise SourceError(f"{path}: missing AI4I columns {missing}")
        frame = frame[needed].sort_values("UDI").iloc[start_row:]
        self.rows = frame if rows is None else frame.iloc[:rows]
        self.metrics = AI4I_METRICS
        self.description = f"AI4I 2020 replay {path.name} from row {start_row}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self.rows.itertuples(index=False):
            yield {"product_type": str(row[1]), "air_temperature": float(row[2]), "process_temperature": float(row[3]),
                   "rotational_speed": float(row[4]), "torque": float(row[5]), "tool_wear": float(row[6])}


class SimulatedMill:
    """Generated AI4I-type data following the dataset's documented generator (no real data needed).

    Product mix L/M/H 60/30/10% as in the data; spindle power drawn from N(6,278 W, 1,069 W), the
    power measured on the AI4I file, and speed = power / torque within the data's 1,168-2,886 rpm;
    tool changed at a wear drawn in 200-240 min.
    """

    def __init__(self, *, seed: int = 0, rows: int | None = None):
        self.seed, self.rows = seed, rows
        self.metrics = AI4I_METRICS
        self.description = f"simulated mill (generated data, seed {seed})"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng(self.seed)
        air, offset, wear, change_at = 300.0, 0.0, 0.0, rng.uniform(200, 240)
        count = 0
        while self.rows is None or count < self.rows:
            air = 300.0 + 0.99 * (air - 300.0) + rng.normal(0, 2.0 * math.sqrt(1 - 0.99**2))
            offset = 0.99 * offset + rng.normal(0, math.sqrt(1 - 0.99**2))
            kind = rng.choice(["L", "M", "H"], p=[0.6, 0.3, 0.1])
            torque = max(3.8, rng.normal(40.0, 10.0))
            speed = min(2886.0, max(1168.0, rng.normal(6278.0, 1069.0) / (torque * 2 * math.pi / 60)))
            wear += {"L": 2.0, "M": 3.0, "H": 5.0}[kind]
            if wear >= change_at:
                wear, change_at = 0.0, rng.uniform(200, 240)
            count += 1
            yield {"product_type": str(kind), "air_temperature": round(air, 1),
                   "process_temperature": round(air + 10.0 + offset, 1), "rotational_speed": round(speed),
                   "torque": round(torque, 1), "tool_wear": wear}


# FD001-like sensor means and the drift toward failure (generated engines only; not a model of FD001)
_ENGINE_BASE = {"s2": (642.7, 1.5, 0.4), "s3": (1590.5, 12.0, 5.0), "s4": (1409.0, 25.0, 7.0), "s7": (553.4, -2.5, 0.7),
                "s8": (2388.1, 0.15, 0.05), "s9": (9065.0, 40.0, 15.0), "s11": (47.5, 1.0, 0.2),
                "s12": (521.4, -2.0, 0.6), "s13": (2388.1, 0.15, 0.05), "s14": (8143.8, 30.0, 12.0),
                "s15": (8.44, 0.1, 0.03), "s17": (393.2, 4.5, 1.2), "s20": (38.8, -0.6, 0.15),
                "s21": (23.29, -0.35, 0.09)}
_ENGINE_CONST = {"s1": 518.67, "s5": 14.62, "s6": 21.61, "s10": 1.3, "s16": 0.03, "s18": 2388.0, "s19": 100.0}


class SimulatedEngine:
    """A generated turbofan run to failure: exponential drift of the degrading sensors plus noise."""

    def __init__(self, *, seed: int = 0, life_cycles: int | None = None):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.life = life_cycles or int(rng.integers(150, 300))
        self.metrics = _engine_metrics()
        self.description = f"simulated engine (generated data, seed {seed}, life {self.life} cycles)"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng(self.seed + 1)
        for cycle in range(1, self.life + 1):
            damage = math.exp(4.0 * (cycle / self.life - 1.0))
            values: dict[str, Any] = {"cycle": cycle, "setting1": float(rng.normal(0, 0.002)),
                                      "setting2": float(rng.normal(0, 0.0003)), "setting3": 100.0}
            values.update(_ENGINE_CONST)
            for name, (mean, drift, sd) in _ENGINE_BASE.items():
                values[name] = float(mean + drift * damage + rng.normal(0, sd))
            yield {name: values[name] for name in CMAPSS_UNITS}


def make_source(kind: str, *, data: Path | None = None, unit: int = 1, start_row: int = 0, seed: int = 0,
                subset: str = "FD001", rows: int | None = None):
    """`kind`: cmapss | ai4i (replays; `data` is a folder laid out like ../shared/data) or sim-engine | sim-mill."""
    if kind == "cmapss":
        if data is None:
            raise SourceError("--kind cmapss needs --data (a folder with cmapss/train_FD00x.txt.gz)")
        return CmapssReplay(_find(data, "cmapss", f"train_{subset}.txt"), unit=unit)
    if kind == "ai4i":
        if data is None:
            raise SourceError("--kind ai4i needs --data (a folder with ai4i2020/ai4i2020.csv.gz)")
        return AI4IReplay(_find(data, "ai4i2020", "ai4i2020.csv"), start_row=start_row, rows=rows)
    if kind == "sim-engine":
        return SimulatedEngine(seed=seed)
    if kind == "sim-mill":
        return SimulatedMill(seed=seed, rows=rows)
    raise SourceError(f"unknown source {kind!r}: use cmapss, ai4i, sim-engine or sim-mill")


def _find(data: Path, folder: str, name: str) -> Path:
    data = Path(data)
    if data.is_file():
        return data
    for candidate in (data / folder / f"{name}.gz", data / folder / name, data / f"{name}.gz", data / name):
        if candidate.exists():
            return candidate
    raise SourceError(f"{data}: no {name}(.gz) in {data / folder} or {data}")
