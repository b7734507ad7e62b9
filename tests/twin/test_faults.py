"""Fault injection against the twin, through real Mosquitto and the built-in broker (amqtt): values that
overflow 64 bits, spoofed sequence numbers, oversized and malformed payloads, and SIGKILL of the twin
process mid-stream (0 rows lost, 0 stored twice). A history row the database refuses: store/test_history.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from tests import polling
from twin.mqtt.burst_client import BurstClient, BurstClientConfig
from twin.sparkplug.payload import BROKER_MAX_PACKET_BYTES, MAX_PAYLOAD_BYTES
from twin.store.history import DEAD_LETTER_EXCERPT_BYTES, HistoryStore

ROOT = Path(__file__).resolve().parents[2]
GROUP = "plant1"
MILLS = {"mill-1": "edge-mill-1", "mill-2": "edge-mill-2"}  # device -> node, from the demo plant


wait_for = partial(polling.wait_for, interval=0.02)


def now_ms() -> int:
    return int(time.time() * 1000)


def mill_data(serial: int, torque: float = 40.0) -> bytes:
    return json.dumps({"timestamp": now_ms(), "seq": serial % 256, "serial": serial, "metrics": [
        {"name": "product_type", "value": "L"}, {"name": "air_temperature", "value": 300.0},
        {"name": "process_temperature", "value": 310.0}, {"name": "rotational_speed", "value": 1500},
        {"name": "torque", "value": torque}, {"name": "tool_wear", "value": float(serial % 200)}]}).encode()


def births(device: str, bd_seq: int, next_serial: int = 0) -> list[tuple[str, bytes]]:
    node = MILLS[device]
    return [(f"spBv1.0/{GROUP}/NBIRTH/{node}", json.dumps({"timestamp": now_ms(), "seq": 0, "bdSeq": bd_seq}).encode()),
            (f"spBv1.0/{GROUP}/DBIRTH/{node}/{device}", json.dumps(
                {"timestamp": now_ms(), "seq": next_serial % 256, "serial": next_serial}).encode())]


def data_topic(device: str) -> str:
    return f"spBv1.0/{GROUP}/DDATA/{MILLS[device]}/{device}"


# ---------------------------------------------------------------------------------------------- at the door
def test_overflow_spoofing_oversize_and_garbage_are_refused_and_the_twin_carries_on(any_broker, start_twin,
                                                                                     publisher):
    twin = start_twin(any_broker.port, client_id="twin-faults", work_orders_csv=None)
    edge = publisher(any_broker.port, "edge-faults")
    attacker = publisher(any_broker.port, "attacker")
    try:
        twin.wait_connected()
        time.sleep(0.3)  # the twin's SUBACK
        edge.send(births("mill-1", bd_seq=1))
        edge.send([(data_topic("mill-1"), mill_data(s, torque=40.0 + s)) for s in range(5)])
        wait_for(lambda: twin.state.counters["ingested"] == 5, what="the real data")
        topic, node_birth = data_topic("mill-1"), f"spBv1.0/{GROUP}/NBIRTH/edge-mill-1"
        attacks = [
            (topic, b'{"timestamp":9223372036854775813,"seq":5,"metrics":[]}', "out_of_range"),   # int64 overflow
            (topic, b'{"timestamp":%d,"seq":9223372036854775813,"metrics":[]}' % now_ms(), "out_of_range"),
            (topic, b'{"timestamp":%d,"seq":1000000000000000,"metrics":[]}' % now_ms(), "out_of_range"),
            (node_birth, b'{"timestamp":%d,"seq":0,"bdSeq":1000000000000000}' % now_ms(), "out_of_range"),
            (topic, b'{"timestamp":%d,"seq":5,"serial":9223372036854775813}' % now_ms(), "out_of_range"),
            (topic, b'{"timestamp":1,"seq":5,"metrics":[]}', "timestamp_out_of_window"),
            (topic, b'{"timestamp":%d,"seq":5,"pad":"%s"}' % (now_ms(), b"A" * (MAX_PAYLOAD_BYTES + 10)), "oversized"),
            (topic, b'{"timestamp": 1, "seq": 3, "metrics": [', "malformed"),
            (topic, b"\x00\xff" * 100, "malformed"),
            (topic, b"[" * 60_000, "malformed"),                                           # nesting
        ]
        attacker.send([(t, raw) for t, raw, _ in attacks])
        attacker.wait_all_acked()
        wait_for(lambda: twin.state.counters["dead_letter"] == len(attacks), what="every attack dead-lettered")
        # one packet over the broker's limit: the broker drops the sender's connection, the twin never sees it
        connections = attacker.client.connections
        attacker.client.publish(topic, b"B" * (BROKER_MAX_PACKET_BYTES + 1024), qos=1)
        wait_for(lambda: attacker.client.connections > connections, what="the broker dropping the oversized sender")
        # the real device goes on: its data is in order again and moves the live values
        edge.send([(data_topic("mill-1"), mill_data(s, torque=40.0 + s)) for s in range(5, 10)])
        wait_for(lambda: twin.state.counters["ingested"] == 10, what="the real data after the attacks")
        device = twin.state.devices["mill-1"]
        assert device.values["torque"] == 49.0 and device.last_seq == 9, "the live state is not frozen"
        assert twin.state.nodes["edge-mill-1"].bd_seq == 1, "the spoofed bdSeq did not replace the session"
        edge.send([(f"spBv1.0/{GROUP}/NDEATH/edge-mill-1", b'{"bdSeq":1}')])
        wait_for(lambda: not twin.state.nodes["edge-mill-1"].online, what="the real death taking the node offline")
        twin.store.flush()
        counters = twin.state.counters
        expected: dict[str, int] = {}
        for _, _, key in attacks:
            expected[key] = expected.get(key, 0) + 1
        assert {k: counters[k] for k in expected} == expected
        assert counters["dead_letter"] == len(attacks) and counters["internal_error"] == 0
        assert twin.store.seqs("mill-1") == list(range(10))
        letters = twin.store.dead_letters(limit=100)
        assert len(letters) == len(attacks)
        assert all(len(d["payload"].encode()) <= 2 * DEAD_LETTER_EXCERPT_BYTES for d in letters)  # utf-8 'replace'
        big = next(d for d in letters if d["size"] > MAX_PAYLOAD_BYTES)
        assert big["truncated"] and len(big["sha256"]) == 64 and "over the" in big["reason"]
        assert twin.stats()["write_errors"] == 0 and twin.connected.is_set()
    finally:
        edge.stop()
        attacker.stop()
        twin.stop()


# ---------------------------------------------------------------------------------------------- delivery
def test_messages_not_acknowledged_by_the_subscriber_are_redelivered_after_it_dies(any_broker, publisher):
    """The broker half of "nothing acknowledged is lost": what the twin received but had not committed
    (so not acknowledged) when it died comes again on its next connect, with both brokers."""
    got: list[bytes] = []
    config = BurstClientConfig(port=any_broker.port, client_id="sub-durable", clean_session=False, keepalive_s=2)
    sub = BurstClient(config=config, on_messages=lambda m, ack: got.extend(p for _, p in m), defer_acks=True,
                      subscriptions=(("t/#", 1),)).start()
    pub = publisher(any_broker.port, "pub-durable")
    try:
        sub.wait_connected()
        time.sleep(0.3)
        pub.send([("t/x", str(i).encode()) for i in range(20)])
        wait_for(lambda: len(got) == 20, what="20 messages, never acknowledged")
        sub._stop.set()  # die without DISCONNECT, as SIGKILL would: the socket just closes
        sub._sock.close()
        sub._thread.join(5)
        time.sleep(0.5)
        pub.send([("t/x", str(i).encode()) for i in range(20, 50)])  # published while it is away
        pub.wait_all_acked()
        got.clear()
        sub = BurstClient(config=config, on_messages=lambda m, ack: (got.extend(p for _, p in m), ack()),
                          defer_acks=True, subscriptions=(("t/#", 1),)).start()
        wait_for(lambda: {int(p) for p in got} == set(range(50)), what="every message, again or queued")
        time.sleep(0.5)
        sub.stop()  # acknowledged now: a third session gets nothing
        got.clear()
        sub = BurstClient(config=config, on_messages=lambda m, ack: (got.extend(p for _, p in m), ack()),
                          defer_acks=True, subscriptions=(("t/#", 1),)).start()
        sub.wait_connected()
        time.sleep(1.0)
        assert got == []
    finally:
        pub.stop()
        sub.stop()


def start_twin_process(tmp_path: Path, port: int) -> subprocess.Popen:
    config = tmp_path / "twin.json"
    config.write_text(json.dumps({"broker_port": port, "db": str(tmp_path / "twin.db"), "client_id": "twin-killed",
                                  "work_orders_csv": None}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "twin.service", str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=(tmp_path / "twin.log").open("ab"), text=True)
    line = proc.stdout.readline()  # "ready" once connected and subscribed
    assert line.strip() == "ready", f"the twin did not start: {(tmp_path / 'twin.log').read_text()[-2000:]}"
    return proc


@pytest.mark.slow
def test_sigkill_of_the_twin_mid_stream_loses_nothing_and_stores_nothing_twice(any_broker, publisher, tmp_path):
    twin = start_twin_process(tmp_path, any_broker.port)
    edge = publisher(any_broker.port, "edge-killed")
    stop = threading.Event()
    sent: set[tuple[str, int]] = set()

    def stream():
        serial = 0
        while not stop.is_set():
            keys = [(device, serial) for device in MILLS]
            edge.send([(data_topic(d), mill_data(s)) for d, s in keys], keys)
            sent.update(keys)
            serial += 1
            time.sleep(0.005)  # ~300 messages/s over the two mills

    try:
        time.sleep(0.3)
        for device in MILLS:
            edge.send(births(device, bd_seq=1))
        publisher = threading.Thread(target=stream)
        publisher.start()
        for _ in range(2):
            time.sleep(1.0)
            twin.send_signal(signal.SIGKILL)  # mid-stream: rows received, some not yet committed
            twin.wait()
            time.sleep(0.5)                   # the broker queues for the twin's persistent session meanwhile
            twin = start_twin_process(tmp_path, any_broker.port)
        time.sleep(1.0)
        stop.set()
        publisher.join()
        edge.wait_all_acked()
        store = HistoryStore(tmp_path / "twin.db")
        try:
            def stored() -> set[tuple[str, int]]:
                return {(d, s) for d in MILLS for s in store.seqs(d)}
            wait_for(lambda: edge.acked <= stored(), timeout=30, what="every acknowledged row in the history")
            rows = store.count("history")
            assert stored() <= sent, "nothing stored that was not sent"
            assert rows == len(stored()) == len(sent), "0 lost, 0 duplicated"
            assert len(edge.acked) == len(sent) > 1000
        finally:
            store.close()
    finally:
        stop.set()
        edge.stop()
        twin.send_signal(signal.SIGTERM)
        twin.wait(timeout=20)
