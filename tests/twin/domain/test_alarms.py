"""Alarm life cycle (ISA-18.2 states), deadband, health-driven alarms."""

from twin.domain.alarms import AlarmManager
from twin.domain.health import AI4IRuleHealth, Health
from twin.domain.plant import Plant
from twin.domain.state import DeviceState

PLANT = Plant.from_dict({"site": "t", "group": "g", "lines": [{"id": "l", "machines": [
    {"id": "m1", "node": "n1", "kind": "mill", "failure_alarm_prob": 0.5, "sensors": [
        {"name": "torque", "type": "Double", "max": 70, "deadband": 5}]},
    {"id": "e1", "node": "n2", "kind": "engine", "rul_alarm_cycles": 30}]}]})


def device(mid="m1", **values):
    d = DeviceState(PLANT.machines[mid], online=True, born=True, ever_online=True)
    d.values.update(values)
    return d


def test_limit_alarm_is_raised_once_held_by_the_deadband_then_cleared_and_closed_by_ack():
    alarms, d = AlarmManager(), device(torque=75.0)
    raised = alarms.evaluate(d, 1)
    assert [(a.kind, a.metric, a.state) for a in raised] == [("limit_high", "torque", "ACTIVE_UNACK")]
    d.values["torque"] = 80.0
    assert alarms.evaluate(d, 2) == [], "an active alarm is not raised again"
    d.values["torque"] = 68.0  # back under the limit but inside the deadband: still active
    assert alarms.evaluate(d, 3) == []
    d.values["torque"] = 60.0
    cleared = alarms.evaluate(d, 4)
    assert cleared[0].state == "CLEARED_UNACK" and cleared[0].cleared_ms == 4
    closed = alarms.acknowledge(cleared[0].id, user="ann", now_ms=5)
    assert closed.state == "CLOSED" and closed.acked_by == "ann" and not alarms.all_open()
    d.values["torque"] = 90.0
    again = alarms.evaluate(d, 6)
    assert len(again) == 1 and again[0].id != closed.id, "after closing, a new occurrence is a new alarm"


def test_acknowledged_active_alarm_closes_when_it_clears_and_unacked_cleared_alarm_reactivates():
    alarms, d = AlarmManager(), device(torque=75.0)
    alarm = alarms.evaluate(d, 1)[0]
    assert alarms.acknowledge(alarm.id, user="bob", now_ms=2).state == "ACTIVE_ACK"
    assert alarms.acknowledge(alarm.id, user="bob", now_ms=3) is None  # twice: nothing to acknowledge
    d.values["torque"] = 10.0
    assert alarms.evaluate(d, 4)[0].state == "CLOSED"
    d.values["torque"] = 75.0
    second = alarms.evaluate(d, 5)[0]
    d.values["torque"] = 10.0
    alarms.evaluate(d, 6)
    d.values["torque"] = 75.0
    back = alarms.evaluate(d, 7)
    assert [a.id for a in back] == [second.id] and back[0].state == "ACTIVE_UNACK"


def test_offline_stale_and_health_alarms():
    alarms = AlarmManager()
    d = device()
    d.online = False
    assert [a.kind for a in alarms.evaluate(d, 1)] == ["offline"]
    d.online, d.stale = True, True
    kinds = sorted((a.kind, a.state) for a in alarms.evaluate(d, 2))
    assert kinds == [("offline", "CLEARED_UNACK"), ("stale", "ACTIVE_UNACK")]
    engine = device("e1")
    engine.health = Health(rul=12.0)
    assert [a.kind for a in alarms.evaluate(engine, 3)] == ["rul_low"]
    mill = device(product_type="L", air_temperature=300.0, process_temperature=308.0, rotational_speed=1300.0,
                  torque=50.0, tool_wear=10.0)
    mill.health = AI4IRuleHealth().update(mill.machine, mill.values)
    assert mill.health.mode == "HDF" and mill.health.failure_prob > 0.99  # 8.0 K difference and 1300 rpm
    assert [a.kind for a in AlarmManager().evaluate(mill, 4)] == ["failure_risk"]
