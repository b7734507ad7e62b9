"""Sparkplug B on the wire through real brokers: protobuf from the edge agent into the twin's history,
the node's one seq counter and the twin's check of it, the primary host's STATE holding data while the
twin is away, rebirth commands, refused payloads."""

import threading
import time

import orjson
import paho.mqtt.client as mqtt
import pytest

from deploy.edge.agent import EdgeAgent, EdgeConfig
from deploy.edge.sources import SimulatedMill
from tests.polling import wait_for
from tests.services import EmbeddedBroker
from twin.sparkplug import protobuf as sparkplug
from twin.sparkplug.codec import decode
from twin.sparkplug.payload import REBIRTH, Metric, Payload


class Observer:
    """A plain MQTT client watching the namespace, as a Sparkplug tool on the same broker would."""

    def __init__(self, port: int):
        self.messages: list[tuple[str, bytes, float]] = []
        self.qos: list[tuple[str, int]] = []  # (topic, QoS delivered at): the publisher's, as we subscribe at 1
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("spBv1.0/#", qos=1)
        assert ready.wait(10)

    def _on_message(self, client, userdata, m) -> None:
        self.qos.append((m.topic, m.qos))
        self.messages.append((m.topic, m.payload, time.monotonic()))

    def of(self, kind: str) -> list[bytes]:
        return [raw for topic, raw, _ in self.messages if topic.split("/")[2] == kind]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def edge(port: int, tmp_path, *, rows: int, rate: float, primary_host: str | None, payload: str = "protobuf",
         node_metrics_s: float = 5.0):
    return EdgeAgent(config=EdgeConfig(port=port, node="edge-mill-1", device="mill-1", rate_hz=rate, keepalive_s=2,
                                       spool=tmp_path / "edge.spool", backoff_max_s=0.5, payload=payload,
                                       primary_host=primary_host, node_metrics_s=node_metrics_s),
                     source=SimulatedMill(seed=3, rows=rows))


@pytest.mark.parametrize("payload", ["protobuf", "json"])
def test_the_agent_keeps_one_seq_per_edge_node_across_every_message_type_and_the_wrap(
        any_broker, start_twin, tmp_path, payload):
    observer = Observer(any_broker.port)
    twin = start_twin(any_broker.port, client_id=f"twin-seq-{payload}")
    try:
        # 300 DDATA and an NDATA every 20 ms in between: over 256 messages, so the seq wraps
        stats = edge(any_broker.port, tmp_path, rows=300, rate=300.0, primary_host=f"twin-seq-{payload}",
                     payload=payload, node_metrics_s=0.02).run()
        assert stats["produced"] == stats["acknowledged"] == 300
        wait_for(lambda: len(observer.of("DDATA")) >= 300, what="observer")
        wait_for(lambda: twin.committed >= 300, what="history")
        sent = [(topic.split("/")[2], raw) for topic, raw, _ in observer.messages if "/edge-mill-1" in topic]
        kinds = [kind for kind, _ in sent]
        assert kinds[:2] == ["NBIRTH", "DBIRTH"] and kinds.count("NDATA") >= 3 and kinds[-1] == "NDEATH"
        assert decode("NDEATH", sent[-1][1]).seq is None, "Sparkplug: an NDEATH carries no seq"
        # each NBIRTH starts the count at 0 (the host's retained STATE may bring a rebirth right after the first)
        runs: list[list[int]] = []
        for kind, raw in sent[:-1]:
            if kind == "NBIRTH":
                runs.append([])
            runs[-1].append(decode(kind, raw).seq)
        for run in runs:
            assert run == [i % 256 for i in range(len(run))], "one counter from the NBIRTH's 0, +1 a message, 255 -> 0"
        assert max(map(len, runs)) > 256, "the wrap was crossed"
        delivered = {kind: {q for t, q in observer.qos if t.split("/")[2] == kind and "/edge-mill-1" in t}
                     for kind in ("NBIRTH", "DBIRTH", "NDATA", "DDATA")}
        # Mosquitto delivers at the lower of the publisher's and our QoS, so it shows the agent's; amqtt 0.12
        # delivers everything at the subscription's
        births = {0} if not isinstance(any_broker, EmbeddedBroker) else {1}
        assert delivered == {"NBIRTH": births, "DBIRTH": births, "NDATA": {1}, "DDATA": {1}}
        twin.store.flush()
        assert twin.store.seqs("mill-1") == list(range(300)), "the serials, not the seqs, key the history"
        assert twin.state.counters["seq_gap"] == 0 and twin.state.counters["dead_letter"] == 0
        assert not twin.asset("mill-1")["node"]["stale"]
    finally:
        twin.stop()
        observer.close()


def test_a_lost_message_gets_one_rebirth_request_and_the_nbirth_starts_again(any_broker, start_twin, publisher):
    """A node's messages as a Sparkplug edge sends them, one of them lost on the way (never published)."""
    observer = Observer(any_broker.port)
    twin = start_twin(any_broker.port, client_id="twin-gap")
    node, device = "spBv1.0/plant1/{}/edge-mill-2", "spBv1.0/plant1/{}/edge-mill-2/mill-2"
    edge = publisher(any_broker.port, "edge-gap")
    now = int(time.time() * 1000)

    def births(bd: int):
        return [(node.format("NBIRTH"), sparkplug.encode(Payload(now, 0, bd, [Metric(REBIRTH, False, "Boolean")]))),
                (device.format("DBIRTH"), sparkplug.encode(Payload(now, 1, None, [Metric("torque", None, "Double")],
                                                                   serial=0)))]

    def data(seq: int, serial: int):
        return device.format("DDATA"), sparkplug.encode(Payload(now, seq, None, [Metric("torque", 40.0)],
                                                                serial=serial))

    try:
        # NBIRTH 0, DBIRTH 1, then DDATA with seq 2..255, 0..9 (the wrap is no gap) and seq 5 after it lost
        stream = births(bd=1) + [data((serial + 2) % 256, serial) for serial in range(270) if serial != 259]
        edge.send(stream)
        edge.wait_all_acked()
        wait_for(lambda: twin.state.counters["ingested"] == 269, what="the data")
        wait_for(lambda: observer.of("NCMD"), what="the rebirth request")
        assert twin.state.counters["seq_gap"] == 1 and twin.asset("mill-2")["node"]["stale"]
        assert twin.state.counters["out_of_order"] == 0 and twin.state.counters["duplicate"] == 0
        command = sparkplug.decode("NCMD", observer.of("NCMD")[0])
        assert [(m.name, m.value) for m in command.metrics] == [(REBIRTH, True)]
        assert [t for t, _, _ in observer.messages if "/NCMD/" in t] == [node.format("NCMD")]
        # the rebirth: NBIRTH starts the count again at 0, the node is no longer stale, and no more requests
        edge.send(births(bd=2) + [data(2, 270), data(3, 271)])
        edge.wait_all_acked()
        wait_for(lambda: twin.state.counters["ingested"] == 271, what="data after the rebirth")
        marker = observer.client.publish("spBv1.0/plant1/NDATA/marker-only", b"x", qos=1)  # a round trip through
        marker.wait_for_publish(5)                                                         # the broker after them
        wait_for(lambda: any(t.endswith("/marker-only") for t, _, _ in observer.messages), what="marker")
        assert len(observer.of("NCMD")) == 1, "one request for the one gap"
        assert twin.state.counters["seq_gap"] == 1 and not twin.asset("mill-2")["node"]["stale"]
        twin.store.flush()
        assert twin.store.seqs("mill-2") == [s for s in range(272) if s != 259]
    finally:
        twin.stop()
        observer.close()


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
        assert ddata.serial == 199 and ddata.seq is not None
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

        def since_rebirth():  # the seqs of edge-mill-1's messages from its last NBIRTH on
            sent = [(t.split("/")[2], raw) for t, raw, _ in observer.messages if "/edge-mill-1" in t]
            last = max(i for i, (kind, _) in enumerate(sent) if kind == "NBIRTH")
            return [decode(kind, raw).seq for kind, raw in sent[last:]]

        wait_for(lambda: len(since_rebirth()) >= 6, what="data after the rebirth")
        assert since_rebirth()[:6] == [0, 1, 2, 3, 4, 5], "the NBIRTH starts the node's seq again at 0"
        wait_for(lambda: twin.state.nodes["edge-mill-1"].last_seq == 5 or len(since_rebirth()) > 6, what="twin")
        assert twin.state.counters["seq_gap"] == 0 and not twin.asset("mill-1")["node"]["stale"]
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
        # the counter moves when a message is refused, its row lands with the writer's next batch: wait for both
        wait_for(lambda: twin.store.flush() or len(twin.store.dead_letters()) >= 2, what="stored dead letters")
        reasons = sorted(d["reason"] for d in twin.store.dead_letters())
        assert reasons[0].startswith("malformed protobuf") and "over the 65,536-byte limit" in reasons[1]
        assert twin.state.counters["malformed"] == 1 and twin.state.counters["oversized"] == 1
        assert twin.store.count("history") == 0
    finally:
        attacker.close()
        twin.stop()
