"""Sparkplug state rules of the twin, message by message (no broker: the rules themselves)."""

import json

import pytest

from twin.health import default_health_models
from twin.plant import Plant, PlantConfigError
from twin.state import TwinState

PLANT = {"site": "t", "group": "g", "lines": [{"id": "l1", "machines": [
    {"id": "m1", "node": "n1", "kind": "mill", "stale_after_s": 1, "sensors": [
        {"name": "torque", "type": "Double", "unit": "Nm", "max": 70},
        {"name": "product_type", "type": "String"}]},
    {"id": "m2", "node": "n1", "kind": "mill", "sensors": [{"name": "torque", "type": "Double"}]}]}]}


def msg(**fields) -> bytes:
    return json.dumps(fields).encode()


def data(seq, ts=1000, **values):
    return msg(timestamp=ts, seq=seq, metrics=[{"name": k, "value": v} for k, v in values.items()])


@pytest.fixture
def state():
    return TwinState(plant=Plant.from_dict(PLANT), health_models=default_health_models())


def born(state, bd=1, now=0):
    state.apply("spBv1.0/g/NBIRTH/n1", msg(timestamp=1, seq=0, bdSeq=bd), now)
    state.apply("spBv1.0/g/DBIRTH/n1/m1", msg(timestamp=1, seq=0, metrics=[{"name": "torque", "type": "Double"}]), now)


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
    born(state)
    out = state.apply("spBv1.0/g/DDATA/n1/m1", data(0, torque=40.0), 1)
    assert out.ingested.in_order and state.devices["m1"].values["torque"] == 40.0
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(0, torque=41.0), 2).ingested is None
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(3, ts=1003, torque=43.0), 3).ingested.in_order
    late = state.apply("spBv1.0/g/DDATA/n1/m1", data(2, ts=1002, torque=42.0), 4).ingested
    assert late is not None and not late.in_order
    assert state.devices["m1"].values["torque"] == 43.0, "an out-of-order message must not overwrite newer values"
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(2, torque=42.0), 5).ingested is None
    c = state.counters
    assert (c["duplicate"], c["out_of_order"], c["gap"], c["ingested"]) == (2, 1, 1, 3)


def test_old_seqs_outside_the_window_are_checked_against_history():
    asked = []
    state = TwinState(plant=Plant.from_dict(PLANT), health_models={}, last_seqs={"m1": 10_000},
                      seen=lambda device, seq: asked.append((device, seq)) or seq == 5)
    born(state)
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(5), 1).ingested is None
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(6), 1).ingested is not None
    assert state.apply("spBv1.0/g/DDATA/n1/m1", data(10_000), 1).ingested is None  # the restored last seq
    assert asked == [("m1", 5), ("m1", 6)]


@pytest.mark.parametrize("topic,raw,counter", [
    ("spBv1.0/g/DDATA/n1/m1", b"{not json", "malformed"),
    ("spBv1.0/g/DDATA/n1/zz", data(0), "unknown_device"),
    ("spBv1.0/g/DDATA/n9/m1", data(0), "unknown_node"),
    ("spBv1.0/other/DDATA/n1/m1", data(0), "unknown_group"),
    ("spBv1.0/g/XDATA/n1/m1", data(0), "bad_topic"),
    ("spBv1.0/g/DDATA/n1", data(0), "bad_topic"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=1, metrics=[]), "invalid_payload"),
    ("spBv1.0/g/DDATA/n1/m1", msg(timestamp=1, seq=-4), "invalid_payload"),
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
