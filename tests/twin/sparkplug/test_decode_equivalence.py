"""The faster decode (twin.sparkplug.protobuf's short cuts, Payload.values for DDATA) gives what the decode
before it gave, for protobuf and JSON payloads, alone and through the twin's state.

A seeded corpus of payloads, the edge agent's and odd ones (every datatype and value field, zeros,
nulls, two's complement, unknown and repeated aliases and names, alias 0, the serial and bdSeq by
name and by alias, units, missing fields, oversized strings), is decoded and applied to a TwinState;
a digest of each result is compared with the digest the code before the change gave (commit d21e8c6,
recorded in decode_golden.json by running this file as a script there:
`PYTHONPATH=<that checkout> python tests/twin/sparkplug/test_decode_equivalence.py --write`).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from twin.domain.health import default_health_models
from twin.domain.plant import Plant
from twin.domain.state import TwinState
from twin.sparkplug import codec
from twin.sparkplug import protobuf as sparkplug
from twin.sparkplug import sparkplug_b_pb2 as pb
from twin.sparkplug.payload import Limits, Metric, Payload, PayloadError

GOLDEN = Path(__file__).with_name("decode_golden.json")
NOW = 1_765_000_000_000  # fixed: the digests hold timestamps and window checks
SENSORS = ("air_temperature", "process_temperature", "rotational_speed", "torque", "tool_wear")
NAMES = (*SENSORS, "product_type", "unknown_metric", "moeworks/serial", "bdSeq", "", "x" * 140)
LIMITS = (Limits(), Limits(max_string_chars=8, max_name_chars=12))
CHUNK = 10
VALUE_FIELDS = ("double_value", "float_value", "int_value", "long_value", "boolean_value", "string_value")


def _value(rng: random.Random, field: str):
    if field == "double_value":
        return rng.choice([0.0, -0.0, 1.5, -273.15, 300.0 + rng.random(), float("nan"), float("inf"), 1e308])
    if field == "float_value":
        return rng.choice([0.0, 2.5, -1.0, 3.0e38])
    if field == "int_value":
        return rng.choice([0, 1, 2**31 - 1, 2**31, 2**32 - 1])
    if field == "long_value":
        return rng.choice([0, 1, 42, 2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1])
    if field == "boolean_value":
        return rng.choice([False, True])
    return rng.choice(["", "L", "M", "a longer string value"])


def _metric(rng: random.Random, aliases: dict[str, int]) -> dict:
    """One metric: mostly the edge agent's (a known alias, its datatype, a value), often something else."""
    out: dict = {}
    shape = rng.random()
    if shape < 0.55:  # the edge agent's data metric
        name = rng.choice((*SENSORS, "product_type"))
        out["alias"] = aliases[name]
        out["datatype"] = sparkplug.STRING if name == "product_type" else sparkplug.DOUBLE
        field = "string_value" if name == "product_type" else "double_value"
        out[field] = _value(rng, field)
        return out
    if shape < 0.65:  # the serial by name
        out["name"] = "moeworks/serial"
        out["datatype"] = rng.choice([sparkplug.UINT64, sparkplug.UINT64, sparkplug.INT64, sparkplug.DOUBLE])
        out[rng.choice(["long_value", "long_value", "double_value"])] = rng.choice([0, 1, 7, 2**53 - 1, 2**53])
        return out
    if rng.random() < 0.6:
        out["alias"] = rng.choice([0, 1, 7, 8, 99, *aliases.values()])  # 7, 8: the serial and bdSeq in one map
    if rng.random() < 0.6:
        out["name"] = rng.choice(NAMES)
    if rng.random() < 0.85:
        out["datatype"] = rng.choice([0, *range(1, 15), 15, 16, 17, 99])
    if rng.random() < 0.15:
        out["is_null"] = True
    if rng.random() < 0.9:
        field = rng.choice(VALUE_FIELDS)
        out[field] = _value(rng, field)
    if rng.random() < 0.2:
        out["properties"] = {"keys": ["engUnit"], "values": [rng.choice([{"type": 12, "string_value": "Nm"},
                                                                          {"type": 12, "string_value": "u" * 40},
                                                                          {"type": 3, "int_value": 5}])]}
    return out


def _proto(rng: random.Random, aliases: dict[str, int]) -> bytes:
    msg = pb.Payload()
    if rng.random() < 0.95:
        msg.timestamp = rng.choice([NOW, NOW, NOW - 1000, 0, NOW + 10**9, 2**63 + 5])
    if rng.random() < 0.95:
        msg.seq = rng.choice([0, 1, 5, 255, 256, 1000])
    for _ in range(rng.choice([0, 1, 3, 6, 6, 7, 9])):
        metric = msg.metrics.add()
        fields = _metric(rng, aliases)
        props = fields.pop("properties", None)
        for key, value in fields.items():
            setattr(metric, key, value)
        if props is not None:
            metric.properties.keys.extend(props["keys"])
            for value in props["values"]:
                metric.properties.values.add(**value)
    return msg.SerializeToString()


def _json(rng: random.Random) -> bytes:
    doc: dict = {"timestamp": rng.choice([NOW, NOW - 5, -1, "x"]), "seq": rng.choice([0, 3, 255, 256, None])}
    if rng.random() < 0.7:
        doc["serial"] = rng.choice([0, 9, 2**53, True])
    doc["metrics"] = [{"name": rng.choice(NAMES[:8]), "value": rng.choice([1.5, 0, "L", None, True, 2**70]),
                       **({"type": rng.choice(["Double", "String", "Int64", "Nope"])} if rng.random() < 0.3 else {})}
                      for _ in range(rng.choice([0, 2, 6]))]
    text = json.dumps(doc)
    return (rng.choice(["", " ", "\n"]) + text).encode()


def corpus() -> list[tuple[str, bytes]]:
    """(kind, payload): the same bytes on every run (a seeded generator; protobuf serializes deterministically)."""
    rng = random.Random(18)
    aliases = sparkplug.assign_aliases("m1", [*SENSORS, "product_type"])
    edge = [Payload(NOW, k % 256, None, [Metric(n, 300.0 + k % 7, "Double") for n in SENSORS]
                    + [Metric("product_type", "LMH"[k % 3], "String")], serial=k) for k in range(1, 40)]
    out = [("DDATA", sparkplug.encode(p, aliases=aliases, names=False)) for p in edge]
    out += [("DDATA", p.to_json()) for p in edge[:10]]
    for _ in range(700):
        kind = rng.choice(["DDATA"] * 6 + ["NDATA", "DBIRTH", "NBIRTH", "NDEATH", "DDEATH"])
        out.append((kind, _json(rng) if rng.random() < 0.15 else _proto(rng, aliases)))
    return out


def _norm(value) -> str:
    return repr((type(value).__name__, value))


def _decoded(kind: str, raw: bytes, limits: Limits, aliases) -> str:
    try:
        p = codec.decode(kind, raw, now_ms=NOW, limits=limits, aliases=aliases)
    except PayloadError as exc:
        return repr(("refused", exc.reason, exc.key))
    return repr((p.timestamp, p.seq, p.bd_seq, p.serial,
                 [(m.name, _norm(m.value), m.type, m.unit, m.alias) for m in p.metrics]))


def _plant() -> Plant:
    sensors = [{"name": n} for n in SENSORS] + [{"name": "product_type", "type": "String"}]
    return Plant.from_dict({"site": "s", "group": "g", "lines": [{"id": "l", "machines": [
        {"id": "m1", "kind": "mill", "node": "n1", "sensors": sensors}]}]})


def _applied(messages: list[tuple[str, bytes]], limits: Limits) -> list[str]:
    """The twin's state over the corpus (a birth first, then each message on its topic): each Outcome's
    digest, then the counters."""
    state = TwinState(plant=_plant(), health_models=default_health_models(), limits=limits)
    aliases = sparkplug.assign_aliases("m1", [*SENSORS, "product_type"])
    state.apply("spBv1.0/g/NBIRTH/n1", sparkplug.encode(Payload(NOW, 0, 0)), NOW)
    birth = Payload(NOW, 1, None, [Metric(n, None, "String" if n == "product_type" else "Double")
                                   for n in (*SENSORS, "product_type")], serial=1)
    state.apply("spBv1.0/g/DBIRTH/n1/m1", sparkplug.encode(birth, aliases=aliases), NOW)
    out = []
    for kind, raw in messages:
        topic = f"spBv1.0/g/{kind}/n1" + ("/m1" if kind[0] == "D" else "")
        o = state.apply(topic, raw, NOW)
        item = o.ingested
        out.append(repr((None if item is None else (item.device, item.seq, item.timestamp, item.in_order,
                                                    sorted((k, _norm(v)) for k, v in item.values.items()),
                                                    None if item.health is None else item.health.to_dict()),
                         o.dead_letters, o.changed, o.rebirth)))
    out.append(repr(sorted(state.counters.items())))
    return out


def digests() -> dict[str, list[str]]:
    messages = corpus()
    aliases = {alias: name for name, alias in sparkplug.assign_aliases("m1", [*SENSORS, "product_type"]).items()}
    out: dict[str, list[str]] = {}
    for li, limits in enumerate(LIMITS):
        for label, names in (("no_aliases", None), ("aliases", aliases), ("alias_0_named", {0: "torque", **aliases}),
                             ("counters_by_alias", {7: "moeworks/serial", 8: "bdSeq", **aliases})):
            out[f"decode/{label}/limits{li}"] = [_decoded(k, r, limits, names) for k, r in messages]
        out[f"state/limits{li}"] = _applied(messages, limits)
    # one digest per CHUNK results: small enough to keep in the repository, fine enough to find what differs
    return {key: [hashlib.sha256("\n".join(texts[i:i + CHUNK]).encode()).hexdigest()[:16]
                  for i in range(0, len(texts), CHUNK)] for key, texts in out.items()}


def test_decode_and_state_give_what_the_code_before_gave():
    golden = json.loads(GOLDEN.read_text())
    now = digests()
    assert now.keys() == golden.keys()
    messages = corpus()
    for key, expected in golden.items():
        differ = [i for i, (a, b) in enumerate(zip(now[key], expected, strict=True)) if a != b]
        assert not differ, f"{key}: {len(differ)} chunks of {CHUNK} results differ, the first from corpus item " \
                           f"{differ[0] * CHUNK}: {messages[min(differ[0] * CHUNK, len(messages) - 1)]}"


def test_values_mode_holds_the_same_names_and_values_as_the_metrics():
    aliases = {alias: name for name, alias in sparkplug.assign_aliases("m1", [*SENSORS, "product_type"]).items()}
    as_values = 0
    for kind, raw in corpus():
        try:
            plain = codec.decode(kind, raw, now_ms=NOW, aliases=aliases)
        except PayloadError as exc:
            try:
                codec.decode(kind, raw, now_ms=NOW, aliases=aliases, as_values=True)
            except PayloadError as again:
                assert (again.reason, again.key) == (exc.reason, exc.key)
                continue
            raise AssertionError(f"as_values accepted what the metrics path refused: {raw!r}") from None
        got = codec.decode(kind, raw, now_ms=NOW, aliases=aliases, as_values=True)
        assert (got.timestamp, got.seq, got.bd_seq, got.serial) == (plain.timestamp, plain.seq, plain.bd_seq,
                                                                     plain.serial)
        if got.values is None:
            assert [_norm(m.value) for m in got.metrics] == [_norm(m.value) for m in plain.metrics]
            continue
        as_values += 1
        assert not got.metrics
        assert [(n, _norm(v)) for n, v in got.values.items()] == [(m.name, _norm(m.value)) for m in plain.metrics]
    assert as_values > 50  # the short cut is taken (the edge agent's messages), not only the fallback


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(json.dumps(digests(), indent=0) + "\n")
    print(f"wrote {GOLDEN}")
