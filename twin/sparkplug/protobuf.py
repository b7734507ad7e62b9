"""Sparkplug B 3.0 protobuf payloads: our payload model (twin.sparkplug.payload) to and from Eclipse Tahu's schema.

The bytes come from the protobuf package's code generated from twin/sparkplug/sparkplug_b.proto (Tahu's
schema; `make proto` regenerates it), so every Sparkplug tool reads them; tests/twin/sparkplug/test_interop.py
checks that against Tahu's own JavaScript implementation (npm `sparkplug-payload`). A maintained
Python Sparkplug library (pysparkplug, mqtt-spb-wrapper) brings its own MQTT client and node
model; we keep ours (the spool, PUBACK after commit) and need only the payload, so the generated
code it is.

How our model maps (twin/SCHEMA.md, "Protobuf"):
- `timestamp`, `seq` -> Payload.timestamp, Payload.seq.
- `bd_seq` -> the metric `bdSeq` (Int64) on NBIRTH and NDEATH, as Sparkplug 3.0 has it.
- `serial` (our exactly-once key) -> the metric `moeworks/serial` (UInt64), declared on the DBIRTH
  without an alias and sent by name on every DDATA: an ordinary metric that any Sparkplug host
  shows and may ignore, where `uuid`/`body` would change how tools read the whole payload.
- a metric's `unit` -> its property `engUnit` (String), the property Ignition reads; read on births
  only (the twin takes units from births), other properties are ignored.
- every metric carries its datatype, also on data messages: Tahu's decoders pick the value field by
  the datatype and read nothing without it.
- aliases: births declare name + alias, data messages send the alias alone (`names=False`).
Checked at the door like the JSON (twin.sparkplug.payload's Limits, the same PayloadError reasons and
counters): payload size before parsing, then timestamp window, seq/bdSeq/serial ranges, metric
count, name, unit and string lengths. DataSet, Template, Bytes and File values are refused: the twin
has no use for them and they are where a payload nests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from google.protobuf.message import DecodeError

from twin.sparkplug import sparkplug_b_pb2 as pb
from twin.sparkplug.payload import (
    DEFAULT_LIMITS,
    INT64_MAX,
    MAX_SERIAL,
    SEQ_MODULUS,
    Limits,
    Metric,
    Payload,
    PayloadError,
    check_metric_count,
    check_name,
    check_string,
    check_unit,
    check_window,
)

SERIAL_METRIC = "moeworks/serial"
BD_SEQ_METRIC = "bdSeq"
UNIT_PROPERTY = "engUnit"

# Sparkplug datatype ids (the comment block of sparkplug_b.proto)
INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64 = 1, 2, 3, 4, 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT = 9, 10, 11, 12, 13, 14
TYPE_IDS = {"Int64": INT64, "Double": DOUBLE, "Float": FLOAT, "Boolean": BOOLEAN, "String": STRING}
# what each id we read becomes in our model: every integer is an Int64 (a UInt64 above 2^63-1 then fails
# the plant's range check, metric by metric), DateTime is ms since the epoch, Text a String
OUR_TYPES = {INT8: "Int64", INT16: "Int64", INT32: "Int64", INT64: "Int64", UINT8: "Int64", UINT16: "Int64",
             UINT32: "Int64", UINT64: "Int64", DATETIME: "Int64", FLOAT: "Float", DOUBLE: "Double",
             BOOLEAN: "Boolean", STRING: "String", TEXT: "String"}
_SIGNED_32 = frozenset((INT8, INT16, INT32))
_UNSIGNED_64 = frozenset((UINT8, UINT16, UINT32, UINT64, DATETIME))
_ONEOF_TYPES = {"int_value": INT32, "long_value": INT64, "float_value": FLOAT, "double_value": DOUBLE,
                "boolean_value": BOOLEAN, "string_value": STRING}
_TWO_64, _TWO_32 = 2**64, 2**32


def metric_alias(device: str, name: str) -> int:
    """The alias the edge agent gives a device's metric: 32 bits of a hash of (device, name).

    Any number unique within the node would do for Sparkplug; one the twin can compute from its
    plant file lets it read alias-only data that reached it before the birth declaring the aliases
    (queued by the broker while the twin restarted), instead of losing it. Unique within a node
    because the device is hashed in; `assign_aliases` leaves a (one in ~10^7) collision unaliased."""
    digest = hashlib.blake2b(f"{device}/{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def assign_aliases(device: str, names) -> dict[str, int]:
    aliases: dict[str, int] = {}
    taken: set[int] = set()
    for name in names:
        alias = metric_alias(device, name)
        if alias not in taken:  # a collision keeps its name on data messages rather than share an alias
            aliases[name] = alias
            taken.add(alias)
    return aliases


def _datatype(metric: Metric) -> int:
    if metric.type is not None:
        return TYPE_IDS[metric.type]
    value = metric.value
    if type(value) is bool:
        return BOOLEAN
    if type(value) is int:
        return INT64
    if type(value) is str:
        return STRING
    return DOUBLE  # float, and null without a declared type


def _set_value(target, datatype: int, value) -> None:
    if value is None:
        target.is_null = True
    elif datatype == DOUBLE:
        target.double_value = value
    elif datatype == FLOAT:
        target.float_value = value
    elif datatype == INT64:
        target.long_value = value % _TWO_64  # two's complement, as Tahu writes a negative Int64
    elif datatype == UINT64:
        target.long_value = value
    elif datatype == BOOLEAN:
        target.boolean_value = value
    else:
        target.string_value = value


def encode(payload: Payload, *, aliases: Mapping[str, int] | None = None, names: bool = True) -> bytes:
    """Sparkplug B protobuf bytes of `payload`. `aliases` (name -> alias) are attached to the metrics
    they name; `names=False` (data messages) then sends those metrics by alias alone."""
    msg = pb.Payload(timestamp=payload.timestamp)
    if payload.seq is not None:
        msg.seq = payload.seq
    metrics = msg.metrics
    if payload.bd_seq is not None and not any(m.name == BD_SEQ_METRIC for m in payload.metrics):
        metrics.add(name=BD_SEQ_METRIC, datatype=INT64, long_value=payload.bd_seq)
    for metric in payload.metrics:
        datatype = _datatype(metric)
        alias = aliases.get(metric.name) if aliases else None
        out = metrics.add(datatype=datatype)
        if alias is not None:
            out.alias = alias
        if names or alias is None:
            out.name = metric.name
        _set_value(out, datatype, metric.value)
        if metric.unit is not None:
            out.properties.keys.append(UNIT_PROPERTY)
            out.properties.values.add(type=STRING, string_value=metric.unit)
    if payload.serial is not None:
        metrics.add(name=SERIAL_METRIC, datatype=UINT64, long_value=payload.serial)
    return msg.SerializeToString()


def with_seq(raw: bytes, seq: int) -> bytes:
    """`raw` (a serialized Payload) with its `seq` set to `seq`, without parsing it again.

    Protobuf defines a concatenation of two serialized messages as their merge, a scalar field taking
    the last value read; `seq` (field 3) is what `encode` writes after the metrics (field 2) and before
    nothing else we set, so a payload encoded without a seq plus this gives the very bytes `encode`
    would have made with it. (A payload that already had one carries both, the stamped one read.)"""
    return raw + pb.Payload(seq=seq).SerializeToString()


# The datatypes read without a check beyond "its field is not the default" (no two's complement to undo):
# datatype -> (value field, our type). Data messages of the edge agent and of the C-MAPSS and AI4I
# publishers hold only these (Double, plus the mill's String).
_PLAIN = {DOUBLE: ("double_value", "Double"), FLOAT: ("float_value", "Float"), BOOLEAN: ("boolean_value", "Boolean"),
          STRING: ("string_value", "String"), TEXT: ("string_value", "String"),
          UINT8: ("int_value", "Int64"), UINT16: ("int_value", "Int64"), UINT32: ("long_value", "Int64"),
          UINT64: ("long_value", "Int64"), DATETIME: ("long_value", "Int64")}
_NOT_PLAIN = (None, None)
_COUNTERS = frozenset((SERIAL_METRIC, BD_SEQ_METRIC))  # metrics decode takes out of the list
_FIELD_OF = {INT8: "int_value", INT16: "int_value", INT32: "int_value", UINT8: "int_value", UINT16: "int_value",
             INT64: "long_value", UINT32: "long_value", UINT64: "long_value", DATETIME: "long_value",
             FLOAT: "float_value", DOUBLE: "double_value", BOOLEAN: "boolean_value", STRING: "string_value",
             TEXT: "string_value"}


def _value(metric, datatype: int, field: str | None):
    if field is None or metric.is_null:
        return None
    if field not in _ONEOF_TYPES:
        raise PayloadError(f"metric {metric.name[:60]!r}: {field} values are not accepted")
    value = getattr(metric, field)
    if field == "long_value":
        if value > INT64_MAX and datatype not in _UNSIGNED_64:
            value -= _TWO_64  # Int64 travels as two's complement
    elif field == "int_value" and value >= 2**31 and datatype in _SIGNED_32:
        value -= _TWO_32
    return value


def _unit(i: int, name: str | None, properties, limits: Limits) -> str | None:
    for key, value in zip(properties.keys, properties.values, strict=False):
        if key == UNIT_PROPERTY:
            unit = value.string_value if value.WhichOneof("value") == "string_value" else None
            check_unit(i, name, unit, limits)
            return unit
    return None


def _counter(metric: Metric, i: int, high: int) -> int:
    value = metric.value
    if type(value) is not int:
        raise PayloadError(f"metrics[{i}] ({metric.name}) must be an integer, got {type(value).__name__}")
    if not 0 <= value <= high:
        raise PayloadError(f"metric {metric.name!r} = {value} outside 0..{high}", "out_of_range")
    return value


def decode(kind: str, raw: bytes, *, now_ms: int | None = None, limits: Limits = DEFAULT_LIMITS,
           aliases: Mapping[int, str] | None = None, as_values: bool = False) -> Payload:
    """Parse and check a protobuf payload for a message type; raises PayloadError with the reason,
    under the same rules as twin.sparkplug.payload.decode (its docstring) reads the JSON. A metric sent by alias
    alone is named from `aliases` (alias -> name, from the sender's birth); without a match its name
    stays None for the caller to judge.

    `as_values` (data messages): the metrics as Payload.values, name -> value in message order, instead of
    one Metric each, where every metric is named and no name repeats; otherwise (and on births) as
    Payload.metrics. The twin's DDATA path reads only names and values: a Metric per value was a third
    of the decode (benchmarks/RESULTS.md, sparkplug_codec)."""
    if len(raw) > limits.max_payload_bytes:
        raise PayloadError(f"payload of {len(raw):,} bytes is over the {limits.max_payload_bytes:,}-byte limit",
                           "oversized")
    msg = pb.Payload()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise PayloadError(f"malformed protobuf: {str(exc)[:120] or type(exc).__name__}", "malformed") from None
    timestamp = msg.timestamp
    if not timestamp and not msg.HasField("timestamp"):  # HasField only where the default is also legal
        timestamp = None
        if kind not in ("NDEATH", "DDEATH"):
            raise PayloadError("missing field 'timestamp'")
    elif timestamp > INT64_MAX:
        raise PayloadError(f"field 'timestamp' = {timestamp} outside 0..{INT64_MAX}", "out_of_range")
    check_window(kind, timestamp, now_ms, limits)
    seq = msg.seq
    if not seq and not msg.HasField("seq"):
        seq = None
        if kind in ("NBIRTH", "DBIRTH", "NDATA", "DDATA"):
            raise PayloadError("missing field 'seq'")
    elif seq >= SEQ_MODULUS:
        raise PayloadError(f"field 'seq' = {seq} outside 0..{SEQ_MODULUS - 1}", "out_of_range")
    items = msg.metrics
    check_metric_count(len(items), limits)
    bd_seq = serial = None
    metrics = []
    # Field reads cost ~0.1 us each through the protobuf runtime, HasField more: read the values, and ask
    # HasField only where a default (0) is also a legal value (an alias of 0)
    max_name, max_string = limits.max_name_chars, limits.max_string_chars
    births = kind in ("NBIRTH", "DBIRTH")
    # Data messages take two short cuts (each gives what the general path below would, which every other
    # metric takes; tests/twin/sparkplug/test_decode_equivalence.py holds them to it): an alias the birth
    # named with a datatype of _PLAIN and a value other than its default is one Metric without further
    # reads; the serial, sent by name, is read without a Metric. Where alias 0 is named, neither applies.
    plain = not births and not (aliases and 0 in aliases)
    named = aliases.get if aliases is not None and plain else None
    serial_by_name = plain and len(SERIAL_METRIC) <= max_name
    values: dict | None = {} if as_values and plain else None
    for i, item in enumerate(items):
        alias = item.alias
        if alias:
            if named is not None:
                name = named(alias)
                if name is not None and name not in _COUNTERS:
                    datatype = item.datatype
                    if datatype == DOUBLE:  # most data: one branch, no table
                        value, ours = item.double_value, "Double"
                    else:
                        field, ours = _PLAIN.get(datatype, _NOT_PLAIN)
                        value = getattr(item, field) if field is not None else None
                        if type(value) is str and len(value) > max_string:
                            check_string(i, name, value, limits)
                    if value:
                        if values is None:
                            metrics.append(Metric(name, value, ours, None, alias))
                            continue
                        if name not in values:
                            values[name] = value
                            continue
                        return decode(kind, raw, now_ms=now_ms, limits=limits, aliases=aliases)  # a repeated name
        elif serial_by_name:
            value = item.long_value
            if value and value <= MAX_SERIAL and item.datatype == UINT64 and item.name == SERIAL_METRIC:
                serial = value
                continue
        datatype = item.datatype
        if not alias and not item.HasField("alias"):
            alias = None
        # on data, an alias the sender's birth declared names the metric (names in those maps passed this
        # check on the birth): the usual alias-only metric costs no read of its (empty) name
        name = aliases.get(alias) if alias is not None and aliases is not None and not births else None
        if name is None:
            name = item.name or None  # an empty name is no name: it then needs an alias
            if name is None:
                if alias is None:
                    raise PayloadError(f"metrics[{i}] needs a name or an alias")
            elif len(name) > max_name:
                check_name(i, name, limits)
        if datatype in OUR_TYPES:
            # a value other than its field's default proves that field is the one set (a oneof reads its unset
            # members as defaults): the common case, without WhichOneof
            value = getattr(item, _FIELD_OF[datatype])
            if not value or item.is_null:
                value = _value(item, datatype, item.WhichOneof("value"))
            elif datatype == INT64 and value > INT64_MAX:
                value -= _TWO_64  # Int64 travels as two's complement
            elif datatype in _SIGNED_32 and value >= 2**31:
                value -= _TWO_32
        else:
            if datatype or item.HasField("datatype"):
                raise PayloadError(f"metrics[{i}] ({name}): datatype {datatype} is not accepted")
            field = item.WhichOneof("value")
            datatype = _ONEOF_TYPES.get(field, DOUBLE)  # Sparkplug lets data messages leave it out: the field says
            value = _value(item, datatype, field)
        if type(value) is str and len(value) > max_string:
            check_string(i, name, value, limits)
        # units matter on births (the twin reads them there, and ignores properties on data messages)
        unit = _unit(i, name, item.properties, limits) if births and item.HasField("properties") else None
        if values is not None:
            if name is None or name in values:  # an alias no birth named, or a repeated name: as Metrics
                return decode(kind, raw, now_ms=now_ms, limits=limits, aliases=aliases)
            if name == SERIAL_METRIC:
                serial = _counter(Metric(name, value), i, MAX_SERIAL)
            elif name != BD_SEQ_METRIC or kind != "NDEATH":
                values[name] = value
            else:
                return decode(kind, raw, now_ms=now_ms, limits=limits, aliases=aliases)
            continue
        metric = Metric(name, value, OUR_TYPES[datatype], unit, alias)
        if name is not None and (name == SERIAL_METRIC or name == BD_SEQ_METRIC):
            if name == SERIAL_METRIC:
                serial = _counter(metric, i, MAX_SERIAL)
                continue
            if kind in ("NBIRTH", "NDEATH"):
                bd_seq = _counter(metric, i, SEQ_MODULUS - 1)
        metrics.append(metric)
    if bd_seq is None and kind in ("NBIRTH", "NDEATH"):
        raise PayloadError(f"missing metric {BD_SEQ_METRIC!r}")
    return Payload(timestamp or 0, seq, bd_seq, metrics, serial, values)
