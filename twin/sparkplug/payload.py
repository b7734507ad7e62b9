"""Sparkplug B topics, the payload model the edge and the twin exchange, and its JSON encoding.

Topic namespace (Sparkplug B 3.0):  ``spBv1.0/<group>/<type>/<edge node>[/<device>]`` with
``type`` one of NBIRTH, NDEATH, DBIRTH, DDEATH, NDATA, DDATA, NCMD, DCMD. On the wire the payload
is Sparkplug's protobuf by default (twin.sparkplug.protobuf) or, as an option, the JSON whose schema is
``PAYLOAD_SCHEMA`` below (twin/SCHEMA.md); twin.sparkplug.codec picks between them.

``seq`` and ``bdSeq`` follow Sparkplug B 3.0: 0-255, wrapping, compared modulo 256 (a message at
most 127 ahead is newer). ``seq`` is one counter per edge node over its NBIRTH (which resets it to
0), DBIRTH, NDATA, DDATA and DDEATH; an edge stamps it when it publishes (twin.sparkplug.codec.with_seq).
One addition for exactly-once history: ``serial``, the device's data message number kept on the
edge's disk (it never wraps and survives restarts; it has no relation to ``seq``, which a resend
from the spool gets anew); the history's key is (device, serial). Every field is bounded here (`Limits`): what is out
of range is refused with a reason and a counter key, never passed on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import orjson

NAMESPACE = "spBv1.0"
MESSAGE_TYPES = ("NBIRTH", "NDEATH", "DBIRTH", "DDEATH", "NDATA", "DDATA", "NCMD", "DCMD")
DATATYPES = ("Double", "Float", "Int64", "Boolean", "String")
REBIRTH = "Node Control/Rebirth"

SEQ_MODULUS = 256                  # Sparkplug B 3.0: seq and bdSeq are 0-255 and wrap
MAX_SERIAL = 2**53 - 1             # exact in every JSON reader (and in a signed 64-bit column)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
# The twin refuses (dead-letters) a payload over MAX_PAYLOAD_BYTES; the brokers drop the connection
# of a client sending a packet over BROKER_MAX_PACKET_BYTES (Mosquitto `max_packet_size`, the
# built-in broker's reader), so a payload between the two still reaches the twin and is counted.
# Our largest real message, a C-MAPSS DDATA with 25 metrics, is about 1.2 KB.
MAX_PAYLOAD_BYTES = 64 * 1024
BROKER_MAX_PACKET_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Bounds on every payload field. Timestamps are checked against the twin's clock (`now_ms`)."""

    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_metrics: int = 256                 # a C-MAPSS message has 25, a birth declares each metric once
    max_name_chars: int = 128
    max_unit_chars: int = 32
    max_string_chars: int = 1024           # a String metric's value
    max_age_ms: int = 30 * 86_400_000      # an edge's spool may hold a month of data after an outage...
    max_ahead_ms: int = 5 * 60_000         # ...but a clock more than 5 minutes ahead of ours is wrong

    def __post_init__(self):
        for name in ("max_payload_bytes", "max_metrics", "max_name_chars", "max_unit_chars", "max_string_chars",
                     "max_age_ms", "max_ahead_ms"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative integer, got {value!r}")


DEFAULT_LIMITS = Limits()

PAYLOAD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "moeworks Sparkplug-style JSON payload",
    "type": "object",
    "required": ["timestamp"],
    "properties": {
        "timestamp": {"type": "integer", "minimum": 0, "maximum": INT64_MAX,
                      "description": "ms since the Unix epoch, set by the edge; refused outside "
                                     "[twin clock - max_age, twin clock + max_ahead]"},
        "seq": {"type": "integer", "minimum": 0, "maximum": SEQ_MODULUS - 1,
                "description": "Sparkplug B sequence number: one counter per edge node over NBIRTH (0), DBIRTH, "
                               "NDATA, DDATA and DDEATH, +1 per message and wrapping after 255; required on NBIRTH, "
                               "DBIRTH, NDATA, DDATA."},
        "serial": {"type": "integer", "minimum": 0, "maximum": MAX_SERIAL,
                   "description": "DDATA (and DBIRTH: the next one): the device's data message number, kept on the "
                                  "edge's disk, never wrapping (independent of seq). Key of the history"},
        "bdSeq": {"type": "integer", "minimum": 0, "maximum": SEQ_MODULUS - 1,
                  "description": "birth/death session number (0-255, wrapping): NBIRTH and its NDEATH (the MQTT "
                                 "will) carry the same"},
        "metrics": {
            "type": "array",
            "maxItems": DEFAULT_LIMITS.max_metrics,
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": DEFAULT_LIMITS.max_name_chars},
                    "value": {"type": ["number", "boolean", "string", "null"]},
                    "type": {"enum": list(DATATYPES), "description": "births declare each metric's datatype"},
                    "unit": {"type": "string", "maxLength": DEFAULT_LIMITS.max_unit_chars,
                             "description": "births declare each metric's unit"},
                },
            },
        },
    },
}


class PayloadError(ValueError):
    """A message the twin cannot use; `reason` is short and goes to the dead-letter table, `key` names the
    counter it is counted under."""

    def __init__(self, reason: str, key: str = "invalid_payload"):
        super().__init__(reason)
        self.reason = reason
        self.key = key


@dataclass(frozen=True)
class Topic:
    group: str
    kind: str  # one of MESSAGE_TYPES
    node: str
    device: str | None = None

    def __str__(self) -> str:
        parts = [NAMESPACE, self.group, self.kind, self.node] + ([self.device] if self.device else [])
        return "/".join(parts)


def parse_topic(topic: str) -> Topic:
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
        raise PayloadError(f"topic outside {NAMESPACE}/<group>/<type>/<node>[/<device>]: {topic[:200]!r}", "bad_topic")
    kind = parts[2]
    if kind not in MESSAGE_TYPES:
        raise PayloadError(f"unknown message type {kind[:50]!r}", "bad_topic")
    is_device = kind[0] == "D"
    if is_device != (len(parts) == 5) or not all(parts[1:]):
        raise PayloadError(f"{kind} topic needs {'a device' if is_device else 'no device'} level: {topic[:200]!r}",
                           "bad_topic")
    return Topic(parts[1], kind, parts[3], parts[4] if is_device else None)


@dataclass(slots=True)
class Metric:
    name: str | None                 # None: a Sparkplug data message naming the metric by its alias alone
    value: Any = None
    type: str | None = None
    unit: str | None = None
    alias: int | None = None         # Sparkplug metric alias (protobuf only), declared with the name on births


@dataclass
class Payload:
    timestamp: int
    seq: int | None = None
    bd_seq: int | None = None
    metrics: list[Metric] = field(default_factory=list)
    serial: int | None = None
    # a data message's metrics as name -> value, in place of `metrics`, where the decoder was asked for it
    # and every metric was named once (twin.sparkplug.protobuf.decode's `as_values`); None otherwise
    values: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        out: dict[str, Any] = {"timestamp": self.timestamp}
        if self.seq is not None:
            out["seq"] = self.seq
        if self.serial is not None:
            out["serial"] = self.serial
        if self.bd_seq is not None:
            out["bdSeq"] = self.bd_seq
        out["metrics"] = [{k: v for k, v in (("name", m.name), ("value", m.value), ("type", m.type), ("unit", m.unit))
                           if v is not None or k == "value"} for m in self.metrics]
        return json.dumps(out, separators=(",", ":")).encode()


def seq_delta(new: int, old: int) -> int:
    """How far `new` is ahead of `old` on Sparkplug's 0-255 circle: 1..127 ahead, 0 the same, -128..-1 behind."""
    delta = (new - old) % SEQ_MODULUS
    return delta - SEQ_MODULUS if delta >= SEQ_MODULUS // 2 else delta


def _int(obj: dict, key: str, required: bool, high: int) -> int | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise PayloadError(f"missing field {key!r}")
        return None
    if type(value) is not int:  # bool is an int subclass: refuse it explicitly
        raise PayloadError(f"field {key!r} must be an integer, got {_short(value)}")
    if not 0 <= value <= high:
        raise PayloadError(f"field {key!r} = {_short(value)} outside 0..{high}", "out_of_range")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def decode(kind: str, raw: bytes, *, now_ms: int | None = None, limits: Limits = DEFAULT_LIMITS) -> Payload:
    """Parse and check a payload for a message type; raises PayloadError with the reason.

    Refused whole: over `limits.max_payload_bytes`, malformed JSON, a missing or mistyped field, a seq or
    bdSeq outside 0-255, a serial outside 0..2^53-1, a timestamp outside the window
    around `now_ms` (when given), too many metrics, a metric name or unit out of bounds. A metric VALUE
    that does not fit its datatype is the state's business (`value_fits`): that metric alone is dropped.
    """
    if len(raw) > limits.max_payload_bytes:
        raise PayloadError(f"payload of {len(raw):,} bytes is over the {limits.max_payload_bytes:,}-byte limit",
                           "oversized")
    try:
        obj = orjson.loads(raw)  # ~4x the stdlib's speed: this runs once per message
    except orjson.JSONDecodeError:
        try:  # the stdlib also reads NaN and Infinity, which the metric checks then refuse one by one
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PayloadError(f"malformed JSON: {exc.msg if hasattr(exc, 'msg') else exc}", "malformed") from None
        except (ValueError, RecursionError) as exc:  # nesting deeper than the interpreter's stack
            raise PayloadError(f"malformed JSON: {type(exc).__name__}", "malformed") from None
    if not isinstance(obj, dict):
        raise PayloadError("payload must be a JSON object")
    # the common case, a well-formed in-range integer, without a call; _int explains everything else
    timestamp = obj.get("timestamp")
    if type(timestamp) is not int or not 0 <= timestamp <= INT64_MAX:
        timestamp = _int(obj, "timestamp", kind not in ("NDEATH", "DDEATH"), INT64_MAX)
    check_window(kind, timestamp, now_ms, limits)
    seq = obj.get("seq")
    if type(seq) is not int or not 0 <= seq < SEQ_MODULUS:
        seq = _int(obj, "seq", kind in ("NBIRTH", "DBIRTH", "NDATA", "DDATA"), SEQ_MODULUS - 1)
    bd_seq = obj.get("bdSeq")
    if bd_seq is not None or kind in ("NBIRTH", "NDEATH"):
        bd_seq = _int(obj, "bdSeq", kind in ("NBIRTH", "NDEATH"), SEQ_MODULUS - 1)
    serial = obj.get("serial")
    if serial is not None:
        serial = _int(obj, "serial", False, MAX_SERIAL)
    raw_metrics = obj.get("metrics", [])
    if not isinstance(raw_metrics, list):
        raise PayloadError("field 'metrics' must be a list")
    check_metric_count(len(raw_metrics), limits)
    metrics = []
    for i, item in enumerate(raw_metrics):
        name = item.get("name") if type(item) is dict else None
        if type(name) is not str:
            raise PayloadError(f"metrics[{i}] needs a string 'name'")
        if not 0 < len(name) <= limits.max_name_chars:
            check_name(i, name, limits)
        declared = item.get("type")
        if declared is not None and declared not in DATATYPES:
            raise PayloadError(f"metrics[{i}] ({name}): unknown type {_short(declared)}")
        unit = item.get("unit")
        if unit is not None:
            check_unit(i, name, unit, limits)
        value = item.get("value")
        if type(value) is str and len(value) > limits.max_string_chars:
            check_string(i, name, value, limits)
        metrics.append(Metric(name, value, declared, unit))
    return Payload(timestamp or 0, seq, bd_seq, metrics, serial)


# The bounds both codecs (this JSON and twin.sparkplug.protobuf) check, each raising the same PayloadError.
def check_window(kind: str, timestamp: int | None, now_ms: int | None, limits: Limits) -> None:
    # an NDEATH's timestamp is when its will was registered (the connect), days back on a long session
    if timestamp is not None and now_ms is not None and kind != "NDEATH" and not (
            now_ms - limits.max_age_ms <= timestamp <= now_ms + limits.max_ahead_ms):
        raise PayloadError(f"timestamp {timestamp} is {(timestamp - now_ms) / 1000:+.0f} s from the twin's clock, "
                           f"outside -{limits.max_age_ms // 1000} s..+{limits.max_ahead_ms // 1000} s",
                           "timestamp_out_of_window")


def check_metric_count(count: int, limits: Limits) -> None:
    if count > limits.max_metrics:
        raise PayloadError(f"{count} metrics, over the limit of {limits.max_metrics}", "out_of_range")


def check_name(i: int, name: str, limits: Limits) -> None:
    if not 0 < len(name) <= limits.max_name_chars:
        raise PayloadError(f"metrics[{i}]: a name of {len(name)} characters (1..{limits.max_name_chars})",
                           "out_of_range")


def check_unit(i: int, name: str | None, unit: Any, limits: Limits) -> None:
    if type(unit) is not str or len(unit) > limits.max_unit_chars:
        raise PayloadError(f"metrics[{i}] ({name}): 'unit' must be a string of at most "
                           f"{limits.max_unit_chars} characters", "out_of_range")


def check_string(i: int, name: str | None, value: str, limits: Limits) -> None:
    if len(value) > limits.max_string_chars:
        raise PayloadError(f"metrics[{i}] ({name}): a string of {len(value)} characters, over "
                           f"{limits.max_string_chars}", "out_of_range")


def value_fits(datatype: str, value: Any) -> bool:
    """Does a JSON value fit a declared Sparkplug datatype, in its range? (null is allowed: Sparkplug's is_null)"""
    if value is None:
        return True
    kind = type(value)
    if datatype == "Double":  # the hot path: no tuple per call
        return (kind is float and math.isfinite(value)) or (kind is int and INT64_MIN <= value <= INT64_MAX)
    if datatype == "Float":
        return (kind is float and -FLOAT32_MAX <= value <= FLOAT32_MAX) or (
            kind is int and INT64_MIN <= value <= INT64_MAX)
    if datatype == "Int64":
        return kind is int and INT64_MIN <= value <= INT64_MAX
    if datatype == "Boolean":
        return kind is bool
    return kind is str
