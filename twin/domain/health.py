"""Health of an asset from its telemetry: RUL for engines, failure probability and mode for mills.

The twin asks a `HealthModel` per machine kind. `ai4i_rule_flags` implements the failure rules
documented with the AI4I 2020 data; the learned models live in manufacturing.maintenance and are
plugged in through the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from twin.domain.plant import Machine

MODES = ("TWF", "HDF", "PWF", "OSF", "RNF")
OSF_LIMIT = {"L": 11_000.0, "M": 12_000.0, "H": 13_000.0}  # tool wear x torque, min*Nm, per product variant
AI4I_COLUMNS = {  # twin metric -> AI4I 2020 column
    "product_type": "Type",
    "air_temperature": "Air temperature [K]",
    "process_temperature": "Process temperature [K]",
    "rotational_speed": "Rotational speed [rpm]",
    "torque": "Torque [Nm]",
    "tool_wear": "Tool wear [min]",
}


@dataclass
class Health:
    rul: float | None = None                     # remaining useful life, cycles (engines)
    rul_sd: float | None = None                  # the RUL model's error spread (validation RMSE), cycles
    failure_prob: float | None = None            # probability of a machine failure now (mills)
    mode_probs: dict[str, float] = field(default_factory=dict)  # per failure mode (TWF, HDF, PWF, OSF, RNF)
    source: str = ""                             # which model produced it

    @property
    def mode(self) -> str | None:
        return max(self.mode_probs, key=self.mode_probs.get) if self.mode_probs else None

    def to_dict(self) -> dict[str, Any]:
        return {"rul": self.rul, "rul_sd": self.rul_sd, "failure_prob": self.failure_prob, "mode": self.mode,
                "mode_probs": self.mode_probs, "source": self.source}


class HealthModel(Protocol):
    def update(self, machine: Machine, values: dict[str, Any]) -> Health | None:
        """Health after one more data message; `values` holds the latest value of every metric."""


def ai4i_rule_flags(product_type: np.ndarray, air_k: np.ndarray, process_k: np.ndarray, speed_rpm: np.ndarray,
                    torque_nm: np.ndarray, wear_min: np.ndarray) -> dict[str, np.ndarray]:
    """The deterministic AI4I 2020 failure rules on arrays of shape (n,) or on scalars; bool per mode.

    TWF is the window in which the tool fails or is replaced (200-240 min); HDF, PWF and OSF are exact.
    """
    power_w = torque_nm * speed_rpm * (2 * np.pi / 60)
    if isinstance(product_type, str):  # one row (the twin, per message): no numpy round trips
        osf_limit = OSF_LIMIT.get(product_type, OSF_LIMIT["H"])
    else:
        osf_limit = np.where(product_type == "L", OSF_LIMIT["L"], np.where(product_type == "M", OSF_LIMIT["M"],
                                                                            OSF_LIMIT["H"]))
    return {
        "TWF": (wear_min >= 200) & (wear_min <= 240),
        "HDF": ((process_k - air_k) < 8.6) & (speed_rpm < 1380),
        "PWF": (power_w < 3500) | (power_w > 9000),
        "OSF": wear_min * torque_nm > osf_limit,
    }


class AI4IRuleHealth:
    """Failure probability of a mill from the documented rules alone: 1 when HDF, PWF or OSF holds;
    inside the 200-240 min tool-wear window, the fraction of the window already used (a uniform
    failure point in the window); the 0.1% random failure otherwise."""

    random_failure = 0.001  # RNF rate documented with the data
    inline = True           # microseconds a call: the twin runs it on the ingestion path (twin.domain.state)

    def update(self, machine: Machine, values: dict[str, Any]) -> Health | None:
        get = values.get  # runs on every message of every mill: plain locals, no generators
        kind, air, process = get("product_type"), get("air_temperature"), get("process_temperature")
        speed, torque, wear = get("rotational_speed"), get("torque"), get("tool_wear")
        if kind is None or air is None or process is None or speed is None or torque is None or wear is None:
            return None
        wear = float(wear)
        flags = ai4i_rule_flags(kind, float(air), float(process), float(speed), float(torque), wear)
        probs = {"HDF": float(flags["HDF"]), "PWF": float(flags["PWF"]), "OSF": float(flags["OSF"]),
                 "TWF": min(max((wear - 200.0) / 40.0, 0.0), 1.0) if flags["TWF"] else 0.0,
                 "RNF": self.random_failure}
        survive = 1.0
        for p in probs.values():
            survive *= 1.0 - p
        return Health(failure_prob=1.0 - survive, mode_probs=probs, source="ai4i-rules")


class EdgeRULHealth:
    """An engine's RUL as estimated on its edge device (metric `rul_edge`, from the local ONNX model)."""

    inline = True

    def update(self, machine: Machine, values: dict[str, Any]) -> Health | None:
        rul = values.get("rul_edge")
        return Health(rul=float(rul), source="edge-onnx") if isinstance(rul, int | float) else None


def default_health_models() -> dict[str, HealthModel]:
    """Health model per machine kind, before the learned models are plugged in."""
    return {"mill": AI4IRuleHealth(), "engine": EdgeRULHealth()}
