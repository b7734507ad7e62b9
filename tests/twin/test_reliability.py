"""Bad and disordered messages through a real Mosquitto: handled as documented, counted, no crash;
and a twin restart: the broker queues for it, and redelivered messages are not stored twice."""

import json
import time
from functools import partial

import paho.mqtt.client as mqtt

from tests import polling
from twin.service import TwinConfig, TwinService

NODE, DEVICE = "edge-mill-1", "mill-1"
TOPIC = f"spBv1.0/plant1/DDATA/{NODE}/{DEVICE}"


def publisher(port):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-publisher")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def send(client, topic, payload):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    client.publish(topic, raw, qos=1).wait_for_publish(5)


def now_ms():
    return int(time.time() * 1000)


START_MS = now_ms()


def ddata(seq, **values):
    """A plain Sparkplug publisher's DDATA (no serial: the twin extends the node's seq into one).
    The node's seq counts its NBIRTH (0) and DBIRTH (1) too, so its data start at 2."""
    # stamped when sampled, as an edge does: seq 7 sent after seq 8 still carries the earlier time
    # (history is read in timestamp order; two sends within one ms made the order depend on the clock)
    return {"timestamp": START_MS + 10 * seq, "seq": seq,
            "metrics": [{"name": k, "value": v} for k, v in values.items()]}


wait_for = partial(polling.wait_for, timeout=15.0)


def test_bad_disordered_and_redelivered_messages(broker, tmp_path):
    config = TwinConfig(broker_port=broker.port, db=str(tmp_path / "twin.db"), client_id="twin-reliability")
    twin = TwinService(config=config).start()
    twin.wait_connected()
    client = publisher(broker.port)
    send(client, f"spBv1.0/plant1/NBIRTH/{NODE}", {"timestamp": now_ms(), "seq": 0, "bdSeq": 0})
    send(client, f"spBv1.0/plant1/DBIRTH/{NODE}/{DEVICE}", {"timestamp": now_ms(), "seq": 1, "metrics": [
        {"name": "torque", "type": "Double", "unit": "Nm"}]})
    for seq in range(2, 5):
        send(client, TOPIC, ddata(seq, torque=40.0 + seq - 2))
    send(client, TOPIC, b'{"timestamp": 1, "seq": 5, "metrics": [')           # malformed JSON
    send(client, TOPIC, ddata(5, torque=43.0, vibration=0.2))                 # unknown metric: dropped, rest kept
    send(client, TOPIC, ddata(6, torque="high", tool_wear=12.0))              # wrong type: dropped, rest kept
    send(client, TOPIC, ddata(8, torque=46.0))                                # seq gap (7 is late)
    send(client, TOPIC, ddata(7, torque=45.0))                                # out of order: history only
    send(client, TOPIC, ddata(7, torque=45.0))                                # duplicate
    send(client, TOPIC, ddata(3, torque=41.0))                                # duplicate of an old one
    send(client, f"spBv1.0/plant1/DDATA/{NODE}/ghost", ddata(2, torque=1.0))  # unknown device
    send(client, "spBv1.0/plant1/DDATA", b"{}")                               # outside the namespace
    send(client, TOPIC, ddata(9, torque=47.0))
    wait_for(lambda: twin.state.counters["received"] >= 15)
    twin.store.flush()
    c = twin.state.counters
    faults = ("malformed", "unknown_metric", "wrong_type", "unknown_device", "bad_topic")
    assert [c[k] for k in faults] == [1, 1, 1, 1, 1]
    assert (c["duplicate"], c["out_of_order"], c["seq_gap"], c["ingested"]) == (2, 1, 1, 8)
    assert twin.asset(DEVICE)["node"]["stale"], "the gap marks the node stale until its next NBIRTH"
    assert twin.store.seqs(DEVICE) == list(range(2, 10)), "the node's seq extended is the plain publisher's key"
    assert twin.state.devices[DEVICE].values["torque"] == 47.0 and twin.state.devices[DEVICE].values["tool_wear"] == 12
    reasons = {d["reason"] for d in twin.store.dead_letters()}
    assert len(reasons) == 5 and any("malformed JSON" in r for r in reasons)
    assert twin.connected.is_set(), "the twin is still up"
    twin.stop()
    # while the twin is down the broker keeps its session's messages; redeliveries must not be stored twice
    for seq in (8, 9, 10):
        send(client, TOPIC, ddata(seq, torque=50.0))
    twin = TwinService(config=config).start()
    try:
        twin.wait_connected()
        wait_for(lambda: twin.state.counters["ingested"] >= 1 and twin.state.counters["duplicate"] >= 2)
        twin.store.flush()
        assert twin.store.seqs(DEVICE) == list(range(2, 11))
        assert twin.state.counters["data_before_birth"] == 1  # the restarted twin asked the node for a rebirth
    finally:
        twin.stop()
        client.loop_stop()
        client.disconnect()
