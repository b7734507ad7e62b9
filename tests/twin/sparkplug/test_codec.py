"""Sparkplug B protobuf payloads: our model to and from the wire, bounded at the door like the JSON,
and the twin's state naming alias-only data."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.domain.plant import Plant
from twin.domain.state import TwinState
from twin.sparkplug import codec
from twin.sparkplug import protobuf as sparkplug
from twin.sparkplug import sparkplug_b_pb2 as pb
from twin.sparkplug.payload import Limits, Metric, Payload, PayloadError

NOW = int(time.time() * 1000)


def proto(**fields) -> bytes:
    """A payload built with the generated classes directly: what another Sparkplug publisher could send."""
    metrics = fields.pop("metrics", [])
    msg = pb.Payload(**fields)
    for metric in metrics:
        msg.metrics.add(**metric)
    return msg.SerializeToString()


def test_birth_and_data_round_trip_with_types_units_aliases_and_serial():
    aliases = sparkplug.assign_aliases("mill-1", ["torque", "tool_wear", "product_type", "running"])
    metrics = [Metric("torque", 41.25, "Double", "Nm"), Metric("tool_wear", -7, "Int64", "min"),
               Metric("product_type", "L", "String"), Metric("running", True, "Boolean"),
               Metric("torque_f", 1.5, "Float"), Metric("spare", None, "Double")]
    birth = sparkplug.encode(Payload(NOW, 5, None, metrics, serial=261), aliases=aliases)
    got = sparkplug.decode("DBIRTH", birth, now_ms=NOW)
    assert (got.timestamp, got.seq, got.serial, got.bd_seq) == (NOW, 5, 261, None)
    assert [(m.name, m.value, m.type, m.unit, m.alias) for m in got.metrics] == [
        ("torque", 41.25, "Double", "Nm", aliases["torque"]), ("tool_wear", -7, "Int64", "min", aliases["tool_wear"]),
        ("product_type", "L", "String", None, aliases["product_type"]),
        ("running", True, "Boolean", None, aliases["running"]),
        ("torque_f", 1.5, "Float", None, None), ("spare", None, "Double", None, None)]
    data = sparkplug.decode("DDATA", sparkplug.encode(Payload(NOW, 6, None, metrics[:2], serial=262), aliases=aliases,
                                                      names=False), now_ms=NOW)
    assert [(m.name, m.alias, m.value) for m in data.metrics] == [(None, aliases["torque"], 41.25),
                                                                  (None, aliases["tool_wear"], -7)]


def test_bd_seq_travels_as_a_metric_and_is_required_on_births_and_deaths():
    raw = sparkplug.encode(Payload(NOW, 0, 200, [Metric("spool_depth", 3, "Int64")]))
    msg = pb.Payload.FromString(raw)
    assert [(m.name, m.datatype, m.long_value) for m in msg.metrics][0] == ("bdSeq", sparkplug.INT64, 200)
    assert sparkplug.decode("NBIRTH", raw, now_ms=NOW).bd_seq == 200
    assert sparkplug.decode("NDEATH", sparkplug.encode(Payload(NOW - 10**12, bd_seq=9)), now_ms=NOW).bd_seq == 9
    with pytest.raises(PayloadError, match="missing metric 'bdSeq'"):
        sparkplug.decode("NBIRTH", proto(timestamp=NOW, seq=0), now_ms=NOW)


@pytest.mark.parametrize("raw, key, reason", [
    (b"\xff\xff\xff", "malformed", "malformed protobuf"),
    (proto(timestamp=NOW, seq=300), "out_of_range", "'seq' = 300"),
    (proto(timestamp=2**64 - 1, seq=1), "out_of_range", "'timestamp'"),
    (proto(timestamp=NOW + 3_600_000, seq=1), "timestamp_out_of_window", "from the twin's clock"),
    (proto(timestamp=NOW), "invalid_payload", "missing field 'seq'"),
    (proto(seq=1), "invalid_payload", "missing field 'timestamp'"),
    (proto(timestamp=NOW, seq=1, metrics=[{"datatype": 10, "double_value": 1.0}]), "invalid_payload",
     "a name or an alias"),
    (proto(timestamp=NOW, seq=1, metrics=[{"name": "x" * 129, "datatype": 10}]), "out_of_range", "129 characters"),
    (proto(timestamp=NOW, seq=1, metrics=[{"name": "s", "datatype": 12, "string_value": "v" * 1025}]),
     "out_of_range", "1025 characters"),
    (proto(timestamp=NOW, seq=1, metrics=[{"name": "t", "datatype": 16, "dataset_value": {"num_of_columns": 1}}]),
     "invalid_payload", "datatype 16 is not accepted"),
    (proto(timestamp=NOW, seq=1, metrics=[{"name": "b", "bytes_value": b"x"}]), "invalid_payload",
     "bytes_value values are not accepted"),
    (proto(timestamp=NOW, seq=1, metrics=[{"name": "moeworks/serial", "datatype": 8, "long_value": 2**60}]),
     "out_of_range", "outside 0.."),
    (proto(timestamp=NOW, seq=0, metrics=[{"name": "bdSeq", "datatype": 4, "long_value": 256}]), "out_of_range",
     "outside 0..255"),
    (proto(timestamp=NOW, seq=1, metrics=[{"name": "m", "datatype": 10, "properties": {
        "keys": ["engUnit"], "values": [{"type": 12, "string_value": "u" * 33}]}}]), "out_of_range", "'unit'"),
], ids=lambda value: "payload" if isinstance(value, bytes) else None)  # the bytes carry the clock: xdist
# workers must collect the same ids
def test_refused_protobuf_gives_a_key_and_a_one_line_reason(raw, key, reason):
    kind = "NBIRTH" if b"bdSeq" in raw else "DBIRTH" if b"engUnit" in raw else "DDATA"  # units: read on births
    with pytest.raises(PayloadError) as refused:
        codec.decode(kind, raw, now_ms=NOW)
    assert refused.value.key == key and reason in refused.value.reason and "\n" not in refused.value.reason


def test_size_and_metric_count_are_bounded_before_and_after_parsing():
    many = proto(timestamp=NOW, seq=1, metrics=[{"name": f"m{i}", "datatype": 10, "double_value": 1.0}
                                                for i in range(257)])
    with pytest.raises(PayloadError) as refused:
        codec.decode("DDATA", many, now_ms=NOW)
    assert refused.value.key == "out_of_range" and "257 metrics" in refused.value.reason
    with pytest.raises(PayloadError) as refused:
        codec.decode("DDATA", many, now_ms=NOW, limits=Limits(max_payload_bytes=1024))
    assert refused.value.key == "oversized"


def test_values_of_other_publishers_decode_by_datatype():
    raw = proto(timestamp=NOW, seq=1, metrics=[
        {"name": "i8", "datatype": 1, "int_value": 2**32 - 3},       # Int8 -3, two's complement in uint32
        {"name": "u32", "datatype": 7, "long_value": 2**32 - 1},
        {"name": "big", "datatype": 8, "long_value": 2**64 - 1},     # UInt64 stays unsigned (the plant's range check
        {"name": "i64", "datatype": 4, "long_value": 2**64 - 1},     # refuses it later); Int64 -1
        {"name": "text", "datatype": 14, "string_value": "t"},
        {"name": "when", "datatype": 13, "long_value": NOW},
        {"name": "untyped", "double_value": 2.5},                    # data messages may leave the datatype out
        {"name": "null", "datatype": 10, "is_null": True}])
    got = {m.name: (m.value, m.type) for m in codec.decode("DDATA", raw, now_ms=NOW).metrics}
    assert got == {"i8": (-3, "Int64"), "u32": (2**32 - 1, "Int64"), "big": (2**64 - 1, "Int64"),
                   "i64": (-1, "Int64"), "text": ("t", "String"), "when": (NOW, "Int64"),
                   "untyped": (2.5, "Double"), "null": (None, "Double")}


def test_codec_reads_json_and_protobuf_by_the_first_byte():
    payload = Payload(NOW, 3, None, [Metric("torque", 1.0)], serial=3)
    for raw in (payload.to_json(), b"\n " + payload.to_json(), sparkplug.encode(payload)):
        got = codec.decode("DDATA", raw, now_ms=NOW)
        assert (got.seq, got.serial, got.metrics[0].value) == (3, 3, 1.0)
    assert codec.encode(payload, "json") == payload.to_json()
    with pytest.raises(ValueError, match="payload must be one of"):
        codec.check_codec("xml", "TwinConfig")


def test_with_seq_stamps_either_codec_as_encode_would_have():
    aliases = sparkplug.assign_aliases("m1", ["torque"])
    unstamped = Payload(NOW, None, None, [Metric("torque", 1.5)], serial=70_000)  # a spooled DDATA
    for seq in (0, 17, 255):
        stamped = Payload(NOW, seq, None, [Metric("torque", 1.5)], serial=70_000)
        raw = codec.with_seq(sparkplug.encode(unstamped, aliases=aliases, names=False), seq)
        assert raw == sparkplug.encode(stamped, aliases=aliases, names=False), "the very bytes encode makes"
        got = codec.decode("DDATA", codec.with_seq(unstamped.to_json(), seq), now_ms=NOW)
        assert (got.seq, got.serial, got.metrics[0].value) == (seq, 70_000, 1.5)
    # a payload that already had a seq (a spool written by an older agent): the stamp is what is read
    old = sparkplug.encode(Payload(NOW, 112, None, [Metric("torque", 1.5)], serial=70_000))
    assert codec.decode("DDATA", codec.with_seq(old, 9), now_ms=NOW).seq == 9
    nan = Payload(NOW, None, None, [Metric("torque", float("nan"))]).to_json()  # the stdlib's bare NaN survives
    assert b'"seq":4' in codec.with_seq(nan, 4) and b"NaN" in codec.with_seq(nan, 4)
    for bad in (-1, 256, True, 1.0):
        with pytest.raises(ValueError, match="seq must be an integer in 0..255"):
            codec.with_seq(sparkplug.encode(unstamped), bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_payload_or_a_payload_error(raw):
    try:
        codec.decode("DDATA", raw, now_ms=NOW)
    except PayloadError as exc:
        assert exc.reason and "\n" not in exc.reason


@pytest.fixture
def state():
    plant = Plant.from_dict({"site": "s", "group": "g", "lines": [{"id": "l1", "machines": [
        {"id": "m1", "kind": "mill", "node": "n1", "sensors": [{"name": "torque", "unit": "Nm"},
                                                                {"name": "tool_wear", "unit": "min"}]}]}]})
    return TwinState(plant=plant, health_models={})


def test_state_names_alias_only_data_from_the_birth_or_the_plant(state):
    aliases = {"torque": 7, "tool_wear": 8}  # a publisher with its own aliases: the birth names them
    nbirth = sparkplug.encode(Payload(NOW, 0, 1, []))
    assert not state.apply("spBv1.0/g/NBIRTH/n1", nbirth, NOW).dead_letters
    birth = Payload(NOW, 0, None, [Metric("torque", None, "Double", "Nm"), Metric("tool_wear", None, "Double")],
                    serial=0)
    assert not state.apply("spBv1.0/g/DBIRTH/n1/m1", sparkplug.encode(birth, aliases=aliases), NOW).dead_letters
    data = Payload(NOW, 0, None, [Metric("torque", 40.0), Metric("tool_wear", 12.0)], serial=0)
    out = state.apply("spBv1.0/g/DDATA/n1/m1", sparkplug.encode(data, aliases=aliases, names=False), NOW)
    assert out.ingested.values == {"torque": 40.0, "tool_wear": 12.0} and not out.dead_letters

    fresh = TwinState(plant=state.plant, health_models={})  # a twin that restarted: no birth seen yet
    ours = sparkplug.assign_aliases("m1", ["torque", "tool_wear"])
    data = Payload(NOW, 1, None, [Metric("torque", 41.0), Metric("tool_wear", 13.0)], serial=1)
    out = fresh.apply("spBv1.0/g/DDATA/n1/m1", sparkplug.encode(data, aliases=ours, names=False), NOW)
    assert out.ingested.values == {"torque": 41.0, "tool_wear": 13.0} and out.rebirth == "n1"

    unknown = proto(timestamp=NOW, seq=2, metrics=[{"alias": 99, "datatype": 10, "double_value": 1.0},
                                                   {"alias": ours["torque"], "datatype": 10, "double_value": 42.0}])
    out = fresh.apply("spBv1.0/g/DDATA/n1/m1", unknown, NOW)
    assert out.ingested.values == {"torque": 42.0} and out.dead_letters == ["alias 99 named by no birth"]
    assert fresh.counters["unknown_metric"] == 1


@pytest.mark.parametrize("args, message", [
    (["edge", "run", "--payload", "xml"], "EdgeConfig.payload must be one of protobuf, json"),
    (["edge", "run", "--primary-host", "a/b"], "EdgeConfig.primary_host must be a non-empty MQTT topic level"),
])
def test_payload_options_refuse_mistakes_in_one_line(args, message, tmp_path):
    from typer.testing import CliRunner

    from deploy.cli import app

    result = CliRunner().invoke(app, args + ["--spool", str(tmp_path / "s.spool"), "--max-messages", "1"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s.spool").exists(), "refused before the agent started"
