"""twin.mqtt.burst_client against paho and a real Mosquitto: packets split anywhere, every length encoding,
acknowledgement after the callback, persistent sessions, and a broker restart."""

import threading
import time
from functools import partial

import paho.mqtt.client as mqtt
import pytest

from tests import polling
from twin.mqtt.burst_client import BurstClient, BurstClientConfig, encode_length, publish_packet

wait_for = partial(polling.wait_for, timeout=15.0, interval=0.02)


class Inbox:
    def __init__(self):
        self.messages: list[tuple[str, bytes]] = []
        self.bursts = 0
        self.lock = threading.Lock()

    def __call__(self, messages):
        with self.lock:
            self.messages.extend(messages)
            self.bursts += 1


def test_remaining_length_encoding_matches_the_spec():
    # MQTT 3.1.1, 2.2.3: the examples at each boundary of 1-4 bytes
    for n, raw in ((0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
                   (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
                   (268_435_455, b"\xff\xff\xff\x7f")):
        assert encode_length(n) == raw


def test_packets_split_at_every_byte_are_parsed_once_and_in_order():
    inbox = Inbox()
    client = BurstClient(config=BurstClientConfig(), on_messages=inbox)  # never connected: nothing is sent
    sent = [(f"spBv1.0/g/DDATA/n/d{i}", bytes([i]) * size, qos)
            for i, (size, qos) in enumerate([(0, 1), (5, 0), (130, 1), (20_000, 1), (3, 0)])]
    stream = b"".join(publish_packet(t, p, q, mid=i + 1) for i, (t, p, q) in enumerate(sent)) + b"\xd0\x00"
    for cut in range(len(stream) + 1):  # every split of the stream into two reads
        inbox.messages.clear()
        buf = bytearray(stream[:cut])
        del buf[:client._handle(buf)]
        buf += stream[cut:]
        del buf[:client._handle(buf)]
        assert not buf
        assert inbox.messages == [(t, p) for t, p, _ in sent]


def test_round_trip_through_mosquitto_with_persistent_session(broker):
    inbox = Inbox()
    config = BurstClientConfig(port=broker.port, client_id="burst-sub", clean_session=False, keepalive_s=2)
    sub = BurstClient(config=config, on_messages=inbox, subscriptions=(("burst/#", 1),)).start()
    sub.wait_connected()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="burst-pub")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        time.sleep(0.3)  # the SUBACK
        payloads = [str(i).encode() * (1 + i % 300) for i in range(2_000)] + [b"x" * 300_000]  # > one read
        infos = [pub.publish(f"burst/{i % 7}", p, qos=1) for i, p in enumerate(payloads)]
        for info in infos:
            info.wait_for_publish(10)
        wait_for(lambda: len(inbox.messages) == len(payloads), what="all messages")
        assert [p for _, p in inbox.messages] == payloads  # in order, each once
        assert inbox.bursts < len(payloads)  # handed over in bursts, not one by one
        time.sleep(5)  # longer than the keepalive: pings keep the connection
        assert sub.connections == 1
        sub.stop()
        for i in range(50):  # queued by the broker for the persistent session
            pub.publish("burst/away", str(i).encode(), qos=1).wait_for_publish(10)
        inbox.messages.clear()
        sub = BurstClient(config=config, on_messages=inbox, subscriptions=(("burst/#", 1),)).start()
        wait_for(lambda: len(inbox.messages) == 50, what="queued messages")
        assert [p for _, p in inbox.messages] == [str(i).encode() for i in range(50)]
        time.sleep(0.5)  # their PUBACKs reach the broker
        sub.stop()
        inbox.messages.clear()
        sub = BurstClient(config=config, on_messages=inbox, subscriptions=(("burst/#", 1),)).start()
        sub.wait_connected()
        time.sleep(1.0)
        assert inbox.messages == []  # acknowledged means not delivered again
    finally:
        sub.stop()
        pub.loop_stop()
        pub.disconnect()


def test_reconnects_after_a_broker_restart_and_sends_what_waited(broker):
    acked: list[int] = []
    inbox = Inbox()
    sub = BurstClient(config=BurstClientConfig(port=broker.port, client_id="restart-sub", clean_session=False,
                                               backoff_max_s=0.5),  # the broker's persistence keeps its session
                      on_messages=inbox, subscriptions=(("r/#", 1),)).start()
    pub = BurstClient(config=BurstClientConfig(port=broker.port, client_id="restart-pub", backoff_max_s=0.5),
                      on_acked=acked.extend).start()
    try:
        sub.wait_connected()
        pub.wait_connected()
        time.sleep(0.3)
        mids = pub.publish_many([("r/a", b"1"), ("r/a", b"2")], qos=1)
        wait_for(lambda: sorted(acked) == sorted(mids), what="PUBACKs")
        broker.stop()
        wait_for(lambda: not pub.connected.is_set() and not sub.connected.is_set(), what="lost connections")
        late = pub.publish("r/a", b"3", qos=1)  # kept until the broker is back
        assert pub.inflight == 1
        broker.start()
        wait_for(lambda: late in acked, what="the late message's PUBACK")
        wait_for(lambda: [p for _, p in inbox.messages][-1:] == [b"3"], what="the late message")
        assert sub.connections == 2 and pub.connections == 2
    finally:
        pub.stop()
        sub.stop()


def test_a_failing_callback_is_logged_and_the_connection_stays(broker, caplog):
    calls = []

    def explode(messages):
        calls.append(len(messages))
        raise RuntimeError("bug in the callback")

    sub = BurstClient(config=BurstClientConfig(port=broker.port, client_id="boom"), on_messages=explode,
                      subscriptions=(("b/#", 1),)).start()
    pub = BurstClient(config=BurstClientConfig(port=broker.port, client_id="boom-pub")).start()
    try:
        sub.wait_connected()
        pub.wait_connected()
        time.sleep(0.3)
        pub.publish("b/1", b"x", qos=1)
        wait_for(lambda: calls, what="the callback")
        pub.publish("b/1", b"y", qos=1)
        wait_for(lambda: sum(calls) == 2, what="the next message")
        assert sub.connections == 1
        assert "bug in the callback" in caplog.text
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.parametrize("qos", [0, 1])
def test_qos1_published_while_disconnected_waits_for_a_connection(qos):
    client = BurstClient(config=BurstClientConfig(port=1))  # nothing listens on port 1
    mid = client.publish("t", b"x", qos=qos)
    assert client.inflight == (1 if qos else 0) and (mid > 0) == bool(qos)  # QoS 0 is fire and forget


def test_qos_2_is_refused_with_a_value_error_before_anything_is_sent():
    client = BurstClient(config=BurstClientConfig(port=1))  # nothing listens on port 1
    with pytest.raises(ValueError, match="QoS 2 is not supported"):
        client.publish("t", b"x", qos=2)
    with pytest.raises(ValueError, match="QoS 2 is not supported"):
        client.subscribe("t/#", qos=2)
    assert client.inflight == 0 and client.subscriptions == ()
