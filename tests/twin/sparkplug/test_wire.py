"""Sparkplug B on the wire through real brokers: protobuf from the edge agent into the twin's history,
the primary host's STATE holding data while the twin is away, rebirth commands, refused payloads."""

import threading
import time

import orjson
import paho.mqtt.client as mqtt

from deploy.edge.agent import EdgeAgent, EdgeConfig
from deploy.edge.sources import SimulatedMill
from tests.polling import wait_for
from twin.sparkplug import protobuf as sparkplug
from twin.sparkplug.payload import REBIRTH, Metric, Payload


class Observer:
    """A plain MQTT client watching the namespace, as a Sparkplug tool on the same broker would."""

    def __init__(self, port: int):
        self.messages: list[tuple[str, bytes, float]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{time.monotonic_ns()}")
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload, time.monotonic()))
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("spBv1.0/#", qos=1)
        assert ready.wait(10)

    def of(self, kind: str) -> list[bytes]:
        return [raw for topic, raw, _ in self.messages if topic.split("/")[2] == kind]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def edge(port: int, tmp_path, *, rows: int, rate: float, primary_host: str | None, payload: str = "protobuf"):
    return EdgeAgent(config=EdgeConfig(port=port, node="edge-mill-1", device="mill-1", rate_hz=rate, keepalive_s=2,
                                       spool=tmp_path / "edge.spool", backoff_max_s=0.5, payload=payload,
                                       primary_host=primary_host),
                     source=SimulatedMill(seed=3, rows=rows))


def test_edge_agent_publishes_protobuf_into_the_twins_history(any_broker, start_twin, tmp_path):
    observer = Observer(any_broker.port)
    twin = start_twin(any_broker.port, client_id="twin-proto")
    try:
        stats = edge(any_broker.port, tmp_path, rows=200, rate=400.0, primary_host="twin-proto").run()
        assert stats["produced"] == stats["acknowledged"] == 200
        wait_for(lambda: twin.committed >= 200, what="history")
        twin.store.flush()
        assert twin.store.seqs("mill-1") == list(range(200)), "every message once, in order"
        assert twin.state.counters["dead_letter"] == 0
        assert set(twin.asset("mill-1")["values"]) >= {"torque", "tool_wear", "air_temperature"}
        wait_for(lambda: len(observer.of("DDATA")) >= 200, what="observer")
        for raw in observer.of("NBIRTH") + observer.of("DBIRTH") + observer.of("DDATA"):
            assert raw[:1] != b"{", "protobuf, not JSON"
        dbirth = sparkplug.decode("DBIRTH", observer.of("DBIRTH")[0])
        declared = {m.alias: m.name for m in dbirth.metrics}
        assert all(m.alias is not None and m.name for m in dbirth.metrics) and dbirth.serial == 0
        ddata = sparkplug.decode("DDATA", observer.of("DDATA")[-1])
        assert ddata.serial == 199 and ddata.seq == 199
        assert all(m.name is None and m.alias in declared for m in ddata.metrics), "data by alias alone"
        assert sparkplug.decode("NBIRTH", observer.of("NBIRTH")[0]).bd_seq is not None
    finally:
        twin.stop()
        observer.close()


def test_state_offline_holds_the_edge_and_online_delivers_everything(broker, start_twin, tmp_path):
    observer = Observer(broker.port)
    twin = start_twin(broker.port, client_id="twin-host")
    agent = edge(broker.port, tmp_path, rows=600, rate=150.0, primary_host="twin-host")
    result = {}
    thread = threading.Thread(target=lambda: result.update(agent.run()))
    thread.start()
    try:
        wait_for(lambda: twin.state.devices["mill-1"].messages > 60, what="first data")
        twin.stop()  # STATE offline, retained
        time.sleep(0.5)  # what was in flight lands in the twin's queue at the broker
        held_from = len(observer.of("DDATA"))
        time.sleep(1.5)  # ~225 ticks produced meanwhile, into the spool
        assert len(observer.of("DDATA")) == held_from, "no data while the primary host is offline"
        births = len(observer.of("NBIRTH"))
        twin = start_twin(broker.port, client_id="twin-host")  # same session: its queue comes back
        thread.join(timeout=60)
        assert result["produced"] == 600 and result["spool_depth"] == 0
        assert len(observer.of("NBIRTH")) > births, "births again when the host comes back"
        wait_for(lambda: twin.store.count("history") >= 600, timeout=30, what="backlog")
        twin.store.flush()
        assert twin.store.seqs("mill-1") == list(range(600)), "0 lost, 0 duplicated"
        states = [orjson.loads(raw) for topic, raw, _ in observer.messages if topic == "spBv1.0/STATE/twin-host"]
        assert [s["online"] for s in states[:2]] == [True, False]
        assert states[0]["timestamp"] == states[1]["timestamp"], "the offline STATE names the session it ends"
    finally:
        thread.join(timeout=60)
        twin.stop()
        observer.close()


def test_the_agent_reads_its_primary_hosts_state_in_order():
    from deploy.edge.agent import _Session

    session = _Session(EdgeConfig(primary_host="twin"), bd_seq=0)  # not connected: its STATE handler alone
    state = session._on_host_state
    assert not session.host_online and not session.rebirth
    state(b'{"online":true,"timestamp":5}')
    assert session.host_online and session.rebirth, "online: births first"
    session.rebirth = False
    state(b'{"online":false,"timestamp":4}')  # the will of an older start of the host: stale
    assert session.host_online and not session.rebirth
    state(b'{"online":true,"timestamp":9}')  # the host restarted and we never read its offline
    assert session.host_online and session.rebirth
    session.rebirth = False
    for junk in (b"{", b"[]", b'{"online":"yes","timestamp":10}', b'{"online":false}', b"\x00"):
        state(junk)
    assert session.host_online and not session.rebirth, "junk changes nothing"
    state(b'{"online":false,"timestamp":9}')  # the will of this start: same timestamp as its online
    assert not session.host_online
    session.client.loop_stop()


def test_rebirth_commands_travel_as_protobuf_both_ways(broker, start_twin, tmp_path):
    observer = Observer(broker.port)
    twin = start_twin(broker.port, client_id="twin-cmd")
    stop = threading.Event()
    agent = edge(broker.port, tmp_path, rows=100_000, rate=20.0, primary_host=None)
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    try:
        # data from a device the twin never saw born: it asks that node for a rebirth, in protobuf
        now = int(time.time() * 1000)
        twin.ingest("spBv1.0/plant1/DDATA/edge-mill-2/mill-2",
                    sparkplug.encode(Payload(now, 0, None, [Metric("torque", 40.0)], serial=0)))
        wait_for(lambda: observer.of("NCMD"), what="rebirth request")
        command = sparkplug.decode("NCMD", observer.of("NCMD")[0])
        assert [(m.name, m.value) for m in command.metrics] == [(REBIRTH, True)]
        # a Sparkplug host's rebirth request to the running agent: it publishes its births again
        wait_for(lambda: twin.state.devices["mill-1"].online, what="agent online")
        births = len(observer.of("NBIRTH"))
        observer.client.publish("spBv1.0/plant1/NCMD/edge-mill-1",
                                sparkplug.encode(Payload(now, metrics=[Metric(REBIRTH, True, "Boolean")])), qos=1)
        wait_for(lambda: len(observer.of("NBIRTH")) > births and len(observer.of("DBIRTH")) > births, what="rebirth")
        assert agent.stats["rebirths"] == 1
    finally:
        stop.set()
        thread.join(timeout=30)
        twin.stop()
        observer.close()


def test_malformed_and_oversized_protobuf_are_dead_letters(broker, start_twin, tmp_path):
    twin = start_twin(broker.port, client_id="twin-bad")
    attacker = Observer(broker.port)
    topic = "spBv1.0/plant1/DDATA/edge-mill-1/mill-1"
    now = int(time.time() * 1000)
    huge = sparkplug.encode(Payload(now, 1, None, [Metric(f"m{i}", "x" * 1000) for i in range(80)], serial=1))
    try:
        assert 64 * 1024 < len(huge) < 1024 * 1024
        for raw in (b"\x08\x96\x01\x12\xff\xff\xff\xff\x0f", huge):
            attacker.client.publish(topic, raw, qos=1).wait_for_publish(5)
        wait_for(lambda: twin.state.counters["dead_letter"] >= 2, what="dead letters")
        twin.store.flush()
        reasons = sorted(d["reason"] for d in twin.store.dead_letters())
        assert reasons[0].startswith("malformed protobuf") and "over the 65,536-byte limit" in reasons[1]
        assert twin.state.counters["malformed"] == 1 and twin.state.counters["oversized"] == 1
        assert twin.store.count("history") == 0
    finally:
        attacker.close()
        twin.stop()
