"""The model-rollout command (twin -> edge node, an NCMD) and report (edge node -> twin, NBIRTH/NDATA metrics).

The command is a normal Sparkplug payload of typed metrics (no JSON inside a string), so it travels
through whichever payload codec the twin and the agents use. `Node Control/Model Rollout` names the
rollout; the other `Model Rollout/...` metrics say where the bundle's files are, the token to fetch
them, the SHA-256 of the bundle's manifest (which lists every file's SHA-256: it names the bundle's
content) and the health gate the node applies after the swap. The agent checks every field here
before acting on it: an NCMD is input from the network like any other.

The node reports its active model and the rollout's progress as node metrics (`Model/...`,
`Rollout/...`) in its NBIRTH and NDATA; the twin reads them from its live node state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from twin.sparkplug.payload import Metric, Payload

COMMAND = "Node Control/Model Rollout"   # value: the rollout id
ACTION, URL, TOKEN, SHA256, VERSION, BYTES = ("Model Rollout/Action", "Model Rollout/URL", "Model Rollout/Token",
                                              "Model Rollout/SHA256", "Model Rollout/Version", "Model Rollout/Bytes")
GATE_ROWS, MAX_DRIFT, MAX_ERROR_RATE, MAX_LATENCY_MS = ("Model Rollout/Gate Rows", "Model Rollout/Max Drift",
                                                        "Model Rollout/Max Error Rate",
                                                        "Model Rollout/Max Latency ms")
# the node's report
MODEL_VERSION, MODEL_PREVIOUS = "Model/Version", "Model/Previous"
ROLLOUT_ID, ROLLOUT_STATE, ROLLOUT_REASON, ROLLOUT_BYTES = ("Rollout/Id", "Rollout/State", "Rollout/Reason",
                                                            "Rollout/Bytes")
NO_MODEL = "none"

# what a node reports, in order; the last four end the node's part in a rollout
NODE_REPORTED = ("downloading", "verifying", "active", "healthy", "refused", "rolled_back", "aborted")
# the twin's own node states: not yet told, told (no report yet), never told (the rollout stopped), no answer
NODE_TWIN = ("pending", "offered", "skipped", "timeout")
NODE_TERMINAL = frozenset({"healthy", "refused", "rolled_back", "aborted", "skipped", "timeout"})

MAX_BUNDLE_BYTES = 600 << 20        # a bundle's model is at most 512 MiB (deploy.bundle.build.MAX_MODEL_BYTES)
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9._:+-]{1,64}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,128}$")


class CommandError(ValueError):
    """An NCMD that is not a usable rollout command (the message says why, in one line)."""


@dataclass(frozen=True)
class HealthGate:
    """What the node checks over the first `rows` rows its new model scores, against the previous model."""
    rows: int = 50                 # at 1 Hz a gate of under a minute: the rollback target
    max_drift: float = 0.2         # mean |p_new - p_previous| of the failure probability over the window
    max_error_rate: float = 0.0    # share of rows the new model failed to score (an exception or a non-finite output)
    max_latency_ms: float = 250.0  # p95 CPU time of one row's scoring: an edge tick is >= 1 s, the model must
                                   # stay well inside (CPU time: the node's own load must not fail a model)

    def __post_init__(self):
        if type(self.rows) is not int or not 1 <= self.rows <= 100_000:
            raise ValueError(f"gate rows must be an integer in 1..100000, got {self.rows!r}")
        for name, high in (("max_drift", 1.0), ("max_error_rate", 1.0), ("max_latency_ms", 60_000.0)):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= high:
                raise ValueError(f"gate {name} must be a number in 0..{high:g}, got {value!r}")


@dataclass(frozen=True)
class RolloutCommand:
    rollout_id: str
    action: str                   # install | abort
    url: str = ""                 # base URL of the bundle's files (ends with /)
    token: str = ""               # bearer token that fetches them
    sha256: str = ""              # SHA-256 of the bundle's manifest.json
    version: str = ""
    bytes: int = 0                # the bundle's total size: the download's bound
    gate: HealthGate = HealthGate()

    def __post_init__(self):
        if not _ID_RE.match(self.rollout_id):
            raise CommandError("rollout id must be 1-64 letters, digits, _ or -")
        if self.action not in ("install", "abort"):
            raise CommandError(f"unknown rollout action {self.action[:20]!r}")
        if self.action == "abort":
            return
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname or not self.url.endswith("/"):
            raise CommandError("rollout URL must be an http(s) URL ending with /")
        if not _TOKEN_RE.match(self.token):
            raise CommandError("rollout token is malformed")
        if not _HEX64.match(self.sha256):
            raise CommandError("rollout SHA-256 must be 64 lowercase hex digits")
        if not VERSION_RE.match(self.version):
            raise CommandError("rollout version must be 1-64 letters, digits or . _ : + -")
        if type(self.bytes) is not int or not 0 < self.bytes <= MAX_BUNDLE_BYTES:
            raise CommandError(f"rollout size must be 1..{MAX_BUNDLE_BYTES} bytes")

    def payload(self, timestamp_ms: int) -> Payload:
        metrics = [Metric(COMMAND, self.rollout_id, "String"), Metric(ACTION, self.action, "String")]
        if self.action == "install":
            metrics += [Metric(URL, self.url, "String"), Metric(TOKEN, self.token, "String"),
                        Metric(SHA256, self.sha256, "String"), Metric(VERSION, self.version, "String"),
                        Metric(BYTES, self.bytes, "Int64"), Metric(GATE_ROWS, self.gate.rows, "Int64"),
                        Metric(MAX_DRIFT, float(self.gate.max_drift), "Double"),
                        Metric(MAX_ERROR_RATE, float(self.gate.max_error_rate), "Double"),
                        Metric(MAX_LATENCY_MS, float(self.gate.max_latency_ms), "Double")]
        return Payload(timestamp_ms, metrics=metrics)

    @classmethod
    def from_payload(cls, payload: Payload) -> RolloutCommand | None:
        """The rollout command in an NCMD, None if it carries none; CommandError if it is malformed."""
        values = {m.name: m.value for m in payload.metrics}
        if COMMAND not in values:
            return None

        def get(name: str, kind: type, default=None):
            value = values.get(name, default)
            if kind is float and type(value) is int:
                value = float(value)
            if type(value) is not kind:
                raise CommandError(f"rollout command field {name!r} must be {kind.__name__}")
            return value

        action = get(ACTION, str)
        if action == "abort":
            return cls(get(COMMAND, str), action)
        try:
            gate = HealthGate(rows=get(GATE_ROWS, int), max_drift=get(MAX_DRIFT, float),
                              max_error_rate=get(MAX_ERROR_RATE, float), max_latency_ms=get(MAX_LATENCY_MS, float))
        except CommandError:
            raise
        except ValueError as error:
            raise CommandError(str(error)) from None
        return cls(get(COMMAND, str), action, get(URL, str), get(TOKEN, str), get(SHA256, str), get(VERSION, str),
                   get(BYTES, int), gate)
