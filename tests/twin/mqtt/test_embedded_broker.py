"""The built-in broker (amqtt with twin.mqtt.embedded_broker's fixes) against Mosquitto's behaviour, with
paho clients: retained messages reach the subscriptions they match and no other client."""

import shutil
import threading

import paho.mqtt.client as mqtt
import pytest

from tests.polling import wait_for
from tests.services import EmbeddedBroker, Mosquitto


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request, tmp_path):
    if request.param == "mosquitto":
        if not shutil.which("mosquitto"):
            pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
        running = Mosquitto(workdir=tmp_path / "mosquitto")
    else:
        running = EmbeddedBroker()
    with running:
        yield running


class Client:
    """A paho client that records what it receives."""

    def __init__(self, port: int, client_id: str, subscribe: str | None = None):
        self.received: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = lambda c, u, m: self.received.append((m.topic, m.payload))
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(subscribe, qos=1) if subscribe else None
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if subscribe:
            wait_for(self.subscribed.is_set, timeout=10, what=f"{client_id}'s SUBACK")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_retained_message_reaches_its_subscribers_and_no_other_client(broker):
    publisher = Client(broker.port, "publisher")
    publisher.client.publish("plant/secret", b"for subscribers of plant/#", qos=1, retain=True).wait_for_publish(5)
    # a client holding a matching filter gets it on SUBSCRIBE...
    reader = Client(broker.port, "reader", subscribe="plant/#")
    wait_for(lambda: reader.received, timeout=10, what="the retained message at the subscriber")
    # ...and one subscribing elsewhere does not, though another client holds `plant/#` (amqtt 0.12 sent every
    # connecting client the retained messages of every filter any client held)
    bystander = Client(broker.port, "bystander", subscribe="other/topic")
    publisher.client.publish("other/topic", b"marker", qos=1).wait_for_publish(5)
    wait_for(lambda: bystander.received, timeout=10, what="the marker at the bystander")
    assert bystander.received == [("other/topic", b"marker")]
    assert reader.received == [("plant/secret", b"for subscribers of plant/#")]
    for client in (publisher, reader, bystander):
        client.close()
