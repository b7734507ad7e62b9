"""Sparkplug state rules of the twin, message by message (no broker: the rules themselves)."""

import json

import pytest

from twin.domain.health import default_health_models
from twin.domain.plant import Plant, PlantConfigError
from twin.domain.state import TwinState

PLANT = {"site": "t", "group": "g", "lines": [{"id": "l1", "machines": [
    {"id": "m1", "node": "n1", "kind": "mill", "stale_after_s": 1, "sensors": [
        {"name": "torque", "type": "Double", "unit": "Nm", "max": 70},
        {"name": "product_type", "type": "String"}]},
    {"id": "m2", "node": "n1", "kind": "mill", "sensors": [{"name": "torque", "type": "Double"}]}]}]}


def msg(**fields) -> bytes:
    return json.dumps(fields).encode()


def data(seq, ts=1000, serial=None, **values):
    fields = {"timestamp": ts, "seq": seq % 256, "metrics": [{"name": k, "value": v} for k, v in values.items()]}
    if serial is not None:
        fields["serial"] = serial
    return msg(**fields)


@pytest.fixture
def state():
    return TwinState(plant=Plant.from_dict(PLANT), health_models=default_health_models())


def born(state, bd=1, now=0):
    """NBIRTH (seq 0) and m1's DBIRTH (seq 1): the node's next message has seq 2."""
    state.apply("spBv1.0/g/NBIRTH/n1", msg(timestamp=1, seq=0, bdSeq=bd), now)
    state.apply("spBv1.0/g/DBIRTH/n1/m1", msg(timestamp=1, seq=1, metrics=[{"name": "torque", "type": "Double"}]), now)


def test_birth_and_death_follow_bdseq(state):
    born(state, bd=1)
    assert state.devices["m1"].online and state.nodes["n1"].online
    out = state.apply("spBv1.0/g/NDEATH/n1", msg(bdSeq=1), 10)
    assert not state.devices["m1"].online and not state.nodes["n1"].online and out.changed == ["m1"]
    # the birth of the dead session arrives late: it must not resurrect the node
    state.apply("spBv1.0/g/NBIRTH/n1", msg(timestamp=1, seq=0, bdSeq=1), 20)
    assert not state.nodes["n1"].online and state.counters["late_birth"] == 1
    born(state, bd=2, now=30)
    assert state.devices["m1"].online
    # a death certificate of an older session does not kill the live one
    state.apply("spBv1.0/g/NDEATH/n1", msg(bdSeq=1), 40)
    assert state.devices["m1"].online and state.counters["stale_death"] == 1


def test_death_overtaking_its_birth_wins(state):
    state.apply("spBv1.0/g/NDEATH/n1", msg(bdSeq=7), 0)
    state.apply("spBv1.0/g/NBIRTH/n1", msg(timestamp=1, seq=0, bdSeq=7), 1)
    state.apply("spBv1.0/g/DBIRTH/n1/m1", msg(timestamp=1, seq=0), 2)
    assert not state.nodes["n1"].online and not state.devices["m1"].online
    assert state.counters["late_birth"] == 2


def test_sequence_numbers_duplicates_out_of_order_and_gaps(state):
    born(state)  # the device's next serial is 0; the node's next seq 2
    out = state.apply("spBv1.0/g/DDATA/n1/m1", data(2, serial=0, torque=40.0), 1)
    assert out.ingested.in_order and state.devices["m1"].values["torque"] == 40.0
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(2, serial=0, torque=41.0), 2).ingested is None  # redelivered
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(3, ts=1003, serial=3, torque=43.0), 3).ingested.in_order
    late = state.apply("spBv1.0/g/DDATA/n1/m1", data(4, ts=1002, serial=2, torque=42.0), 4).ingested
    assert late is not None and not late.in_order
    assert state.devices["m1"].values["torque"] == 43.0, "an out-of-order message must not overwrite newer values"
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(5, serial=2, torque=42.0), 5).ingested is None
    c = state.counters
    assert (c["duplicate"], c["out_of_order"], c["gap"], c["ingested"]) == (2, 1, 1, 3)
    assert c["seq_gap"] == 0, "the node's seq ran without a gap: the serials the edge skipped are `gap`"


def test_one_seq_per_edge_node_over_all_its_message_types(state):
    born(state)
    for seq, (topic, fields) in enumerate([
            ("DBIRTH/n1/m2", {"serial": 0}), ("DDATA/n1/m1", {"serial": 0}), ("NDATA/n1", {}),
            ("DDATA/n1/m2", {"serial": 0}), ("DDATA/n1/m1", {"serial": 1}), ("DDEATH/n1/m2", {})], start=2):
        out = state.apply(f"spBv1.0/g/{topic}", msg(timestamp=1, seq=seq, metrics=[], **fields), 1)
        assert not out.dead_letters and out.rebirth is None
    assert state.counters["seq_gap"] == 0 and not state.nodes["n1"].stale
    assert state.nodes["n1"].last_seq == 7 and state.devices["m1"].last_seq == 1


def test_a_seq_gap_asks_for_one_rebirth_and_marks_the_node_stale_until_its_birth(state):
    born(state)
    ask = [state.apply("spBv1.0/g/DDATA/n1/m1", data(seq, serial=i, torque=1.0), i).rebirth
           for i, seq in enumerate([2, 3, 5, 6, 7])]  # seq 4 was lost
    assert ask == [None, None, "n1", None, None], "one request for the gap, none for the data after it"
    assert state.counters["seq_gap"] == 1 and state.nodes["n1"].stale
    # the lost one turns up late, then a redelivery: behind the count, neither is a second gap
    assert state.apply("spBv1.0/g/NDATA/n1", msg(timestamp=1, seq=4, metrics=[]), 10).rebirth is None
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(6, serial=3), 11).ingested is None
    assert state.counters["seq_gap"] == 1 and state.counters["ingested"] == 5
    born(state, bd=2, now=20)  # the rebirth: NBIRTH starts the count again at 0
    assert not state.nodes["n1"].stale and state.nodes["n1"].last_seq == 1
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(2, serial=5, torque=2.0), 21).ingested.in_order
    assert state.counters["seq_gap"] == 1


def test_seq_gaps_are_read_across_the_wrap_and_a_second_gap_asks_again_later(state):
    born(state)
    now = 0
    for seq in range(2, 256):
        state.apply("spBv1.0/g/NDATA/n1", msg(timestamp=1, seq=seq, metrics=[]), now)
    assert state.apply("spBv1.0/g/NDATA/n1", msg(timestamp=1, seq=0, metrics=[]), now).rebirth is None  # 255 -> 0
    assert state.counters["seq_gap"] == 0 and state.counters["ndata"] == 255
    out = state.apply("spBv1.0/g/NDATA/n1", msg(timestamp=1, seq=3, metrics=[]), now)  # 1 and 2 lost
    assert out.rebirth == "n1" and state.counters["seq_gap"] == 1
    # a second loss before the births came: counted, its request held back while the first is fresh...
    assert state.apply("spBv1.0/g/NDATA/n1", msg(timestamp=1, seq=5, metrics=[]), now + 1).rebirth is None
    # ...and sent once that is older than rebirth_every_ms (the first may have been lost)
    later = state.apply("spBv1.0/g/NDATA/n1", msg(timestamp=1, seq=7, metrics=[]), now + 5_000)
    assert later.rebirth == "n1" and state.counters["seq_gap"] == 3


def test_a_host_that_cannot_see_the_whole_sequence_counts_no_seq_gaps():
    state = TwinState(plant=Plant.from_dict(PLANT), health_models={}, check_seq=False)
    born(state)
    for i, seq in enumerate([2, 9, 4, 30]):  # a scale-out owner: the node's messages came through several workers
        out = state.apply("spBv1.0/g/DDATA/n1/m1", data(seq, serial=i, torque=1.0), i)
        assert out.rebirth is None and out.ingested.in_order
    assert state.counters["seq_gap"] == 0 and not state.nodes["n1"].stale


def test_a_plain_publishers_new_session_does_not_reuse_the_old_sessions_keys(state):
    born(state)
    first = [state.apply("spBv1.0/g/DDATA/n1/m1", data(seq, torque=1.0), 1).ingested.seq for seq in (2, 3)]
    born(state, bd=2, now=2)  # seq starts again at 0: its data repeat the seqs of the last session
    second = [state.apply("spBv1.0/g/DDATA/n1/m1", data(seq, torque=2.0), 3).ingested for seq in (2, 3)]
    assert all(i is not None and i.in_order for i in second), "new data, not duplicates of the old session's"
    assert first == [2, 3] and [i.seq for i in second] == [258, 259]


def test_old_seqs_outside_the_window_are_checked_against_history():
    asked = []
    state = TwinState(plant=Plant.from_dict(PLANT), health_models={}, last_seqs={"m1": 10_000},
                      seen=lambda device, seq: asked.append((device, seq)) or seq in (5, 10_000))
    born(state)
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(2, serial=5), 1).ingested is None
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(3, serial=6), 1).ingested is not None
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(4, serial=10_000), 1).ingested is None  # the restored last
    assert asked == [("m1", 5), ("m1", 6), ("m1", 10_000)]
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(5, serial=10_001), 1).ingested is not None
    assert len(asked) == 3, "above every stored serial, nothing is looked up"


@pytest.mark.parametrize("topic,raw,counter", [
    ("spBv1.0/g/DDATA/n1/m1", b"{not json", "malformed"),
    ("spBv1.0/g/DDATA/n1/zz", data(0), "unknown_device"),
    ("spBv1.0/g/DDATA/n9/m1", data(0), "unknown_node"),
    ("spBv1.0/other/DDATA/n1/m1", data(0), "unknown_group"),
    ("spBv1.0/g/XDATA/n1/m1", data(0), "bad_topic"),
    ("spBv1.0/g/DDATA/n1", data(0), "bad_topic"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=1, metrics=[]), "invalid_payload"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=1, seq=-4), "out_of_range"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=1, seq=True), "invalid_payload"),
    ("spBv1.0/g/DDATA/n1/m1", b"[1,2]", "invalid_payload"),
])
def test_bad_messages_are_dead_lettered_and_counted(state, topic, raw, counter):
    out = state.apply(topic, raw, 0)
    assert out.ingested is None and len(out.dead_letters) == 1
    assert state.counters[counter] == 1 and state.counters["dead_letter"] == 1


def test_unknown_metrics_and_wrong_types_are_dropped_but_the_rest_is_kept(state):
    born(state)
    out = state.apply("spBv1.0/g/DDATA/n1/m1", data(0, torque="high", product_type="L", vibration=3.0), 0)
    assert out.ingested.values == {"product_type": "L"}
    assert state.counters["wrong_type"] == 1 and state.counters["unknown_metric"] == 1
    assert len(out.dead_letters) == 2 and "torque" in out.dead_letters[0]


def test_nan_written_by_python_json_is_read_and_refused_per_metric(state):
    born(state)
    raw = data(0, torque=float("nan"), product_type="L")  # json.dumps writes a bare NaN, which RFC JSON lacks
    assert b"NaN" in raw
    out = state.apply("spBv1.0/g/DDATA/n1/m1", raw, 0)
    assert out.ingested.values == {"product_type": "L"}
    assert state.counters["wrong_type"] == 1 and state.counters["malformed"] == 0


def test_a_burst_of_topics_is_checked_once_each_and_bad_ones_are_never_cached(state):
    born(state)
    for seq in range(3):
        assert state.apply("spBv1.0/g/DDATA/n1/m1", data(seq, torque=1.0), 0).ingested is not None
        assert state.apply("spBv1.0/g/DDATA/n1/m9", data(seq, torque=1.0), 0).dead_letters  # unknown device
        assert state.apply("spBv1.0/g/DDATA/n9/m1", data(seq, torque=1.0), 0).dead_letters  # unknown node
    assert state.counters["ingested"] == 3 and state.counters["unknown_device"] == 3
    assert state.counters["unknown_node"] == 3


def test_data_without_a_birth_is_kept_and_a_rebirth_is_asked_once(state):
    first = state.apply("spBv1.0/g/DDATA/n1/m1", data(0, torque=1.0), 0)
    second = state.apply("spBv1.0/g/DDATA/n1/m1", data(1, torque=1.0), 100)
    third = state.apply("spBv1.0/g/DDATA/n1/m1", data(2, torque=1.0), 10_000)
    assert first.ingested is not None and first.rebirth == "n1"
    assert second.rebirth is None and third.rebirth == "n1"


def test_staleness_follows_the_twin_clock(state):
    born(state, now=0)
    state.apply("spBv1.0/g/DDATA/n1/m1", data(0, torque=1.0), 0)
    assert state.tick(500) == []
    assert state.tick(1_500) == ["m1"] and state.devices["m1"].stale
    state.apply("spBv1.0/g/DDATA/n1/m1", data(1, torque=1.0), 1_600)
    assert not state.devices["m1"].stale


def test_plant_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "plant.yaml"
    bad.write_text("site: s\ngroup: g\nlines:\n  - id: l\n    machines:\n      - {id: a, node: n, kind: robot}\n")
    with pytest.raises(PlantConfigError, match=r"lines\[0\]\.machines\[0\]\.kind"):
        Plant.from_yaml(bad)
    bad.write_text("site: s\ngroup: g\nlines:\n  - id: l\n    machines:\n      - {id: a, node: n, sensors: "
                   "[{name: x, min: 5, max: 1}]}\n")
    with pytest.raises(PlantConfigError, match="min must be below max"):
        Plant.from_yaml(bad)
    plant = Plant.from_yaml()
    assert {m.kind for m in plant.machines.values()} == {"engine", "mill"}
    assert plant.machines["mill-1"].sensors["tool_wear"].max == 200


NOW = 1_765_000_000_000  # the twin's clock in the tests below (Dec 2025), ms
DAY = 86_400_000


@pytest.mark.parametrize("topic,raw,counter", [
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=2**63 + 5, seq=5, metrics=[]), "out_of_range"),   # int64 overflow
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW, seq=2**63 + 5, metrics=[]), "out_of_range"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW, seq=10**15, metrics=[]), "out_of_range"),    # spoofed seq
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW, seq=256, metrics=[]), "out_of_range"),       # Sparkplug: 0-255
    ("spBv1.0/g/NBIRTH/n1", msg(timestamp=NOW, seq=0, bdSeq=10**15), "out_of_range"),         # spoofed bdSeq
    ("spBv1.0/g/NDEATH/n1", msg(bdSeq=256), "out_of_range"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW, seq=1, serial=2**60), "out_of_range"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW - 31 * DAY, seq=1), "timestamp_out_of_window"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW + 600_000, seq=1), "timestamp_out_of_window"),
    ("spBv1.0/g/DDATA/n1/m1", b'{"timestamp":%d,"seq":1,"pad":"%s"}' % (NOW, b"x" * 70_000), "oversized"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW, seq=1, metrics=[{"name": "torque", "value": 1.0}] * 300),
     "out_of_range"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW, seq=1, metrics=[{"name": "t" * 200, "value": 1.0}]), "out_of_range"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW, seq=1, metrics=[{"name": "product_type", "value": "L" * 5000}]),
     "out_of_range"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=NOW, seq=1, metrics=[{"name": "torque", "unit": 7}]), "out_of_range"),
    ("spBv1.0/g/DDATA/n1/m1", b"[" * 5000 + b"]" * 5000, "malformed"),                         # nesting
    ("spBv1.0/g/DDATA/n1/m1", b"\xff\xfe{}", "malformed"),
])
def test_every_field_is_bounded_and_the_refusal_counted(state, topic, raw, counter):
    out = state.apply(topic, raw, NOW)
    assert out.ingested is None and len(out.dead_letters) == 1 and len(out.dead_letters[0]) <= 300
    assert state.counters[counter] == 1 and state.counters["dead_letter"] == 1
    assert not state.nodes["n1"].online and state.devices["m1"].last_seq == -1, "nothing of it reached the state"


def test_an_ndeath_keeps_the_timestamp_of_its_connect(state):
    state.apply("spBv1.0/g/NBIRTH/n1", msg(timestamp=NOW, seq=0, bdSeq=3), NOW)
    state.apply("spBv1.0/g/NDEATH/n1", msg(timestamp=NOW - 90 * DAY, bdSeq=3), NOW)  # a will registered long ago
    assert not state.nodes["n1"].online and state.counters["ndeath"] == 1


def test_values_out_of_their_type_range_are_refused():
    from twin.sparkplug.payload import value_fits

    assert value_fits("Int64", 2**63 - 1) and not value_fits("Int64", 2**63) and not value_fits("Int64", 1.0)
    assert value_fits("Double", -(2**63)) and not value_fits("Double", 2**64)  # an int the writer could not store
    assert not value_fits("Double", float("inf")) and not value_fits("Float", 1e39) and value_fits("Float", 3e38)
    assert not value_fits("Boolean", 1) and not value_fits("String", 1) and value_fits("Double", None)


def test_a_json_number_beyond_64_bits_is_read_as_a_double(state):
    born(state, now=NOW)
    raw = b'{"timestamp":%d,"seq":0,"metrics":[{"name":"torque","value":%d}]}' % (NOW, 2**70)
    out = state.apply("spBv1.0/g/DDATA/n1/m1", raw, NOW)
    assert out.ingested.values == {"torque": float(2**70)} and type(out.ingested.values["torque"]) is float


def test_seq_wraps_after_255_and_stays_in_order(state):
    born(state)  # a plain Sparkplug publisher (no serial): the node's seq, extended, is the serial
    for position in range(2, 262):
        out = state.apply("spBv1.0/g/DDATA/n1/m1", data(position, torque=float(position)), 1)
        assert out.ingested.in_order and out.ingested.seq == position, "the serial is extended across the wrap"
    assert state.counters["out_of_order"] == 0 and state.counters["gap"] == 0 and state.counters["seq_gap"] == 0
    assert state.devices["m1"].values["torque"] == 261.0
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(255), 2).ingested is None  # a redelivery
    assert state.counters["seq_gap"] == 0, "a redelivery behind the count is no gap"


def test_a_spoofed_serial_cannot_freeze_the_live_state(state):
    born(state)
    for serial in range(10):
        state.apply("spBv1.0/g/DDATA/n1/m1", data(serial + 2, serial=serial, torque=40.0), 1)
    # a forged message with a huge serial: accepted once (the broker's ACL is what stops forgers)...
    spoof = 10**15
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(12, serial=spoof, torque=99.0), 2).ingested.in_order
    # ...the real data behind it is kept in history and the node is asked for its births
    out = state.apply("spBv1.0/g/DDATA/n1/m1", data(12, serial=10, torque=41.0), 3)
    assert out.ingested is not None and not out.ingested.in_order and out.rebirth == "n1"
    # whose DBIRTH re-anchors the order: the live values follow the real device again
    state.apply("spBv1.0/g/NBIRTH/n1", msg(timestamp=1, seq=0, bdSeq=2), 4)
    state.apply("spBv1.0/g/DBIRTH/n1/m1", msg(timestamp=1, seq=1, serial=11), 4)
    out = state.apply("spBv1.0/g/DDATA/n1/m1", data(2, serial=11, torque=42.0), 5)
    assert out.ingested.in_order and state.devices["m1"].values["torque"] == 42.0
    assert state.devices["m1"].last_seq == 11


def test_bdseq_wraps_and_a_spoofed_birth_does_not_outlive_the_real_session(state):
    born(state, bd=255)
    assert state.apply("spBv1.0/g/NDEATH/n1", msg(bdSeq=255), 1).changed == ["m1"]
    born(state, bd=0, now=2)  # 255 + 1 wraps to 0: a new session
    assert state.nodes["n1"].online and state.nodes["n1"].bd_seq == 0
    state.apply("spBv1.0/g/NDEATH/n1", msg(bdSeq=254), 3)  # two sessions back
    assert state.nodes["n1"].online and state.counters["stale_death"] == 1
    # a forged birth 100 sessions ahead takes the node over, but the real edge's next birth is accepted
    state.apply("spBv1.0/g/NBIRTH/n1", msg(timestamp=1, seq=0, bdSeq=100), 4)
    born(state, bd=1, now=5)
    assert state.nodes["n1"].bd_seq == 1 and state.counters["late_birth"] == 0
    state.apply("spBv1.0/g/NDEATH/n1", msg(bdSeq=1), 6)
    assert not state.nodes["n1"].online, "the real death certificate takes the node offline"
