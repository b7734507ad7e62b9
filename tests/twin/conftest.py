"""Fixtures the twin's tests share: the brokers a test runs against, twins started on them, publishers that
record which messages the broker acknowledged, and a PostgreSQL server. (`broker`, a plain Mosquitto, is
tests/conftest.py's.)"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.services import EmbeddedBroker, PostgresCluster, ServiceError
from twin.mqtt.burst_client import BurstClient, BurstClientConfig
from twin.service import TwinConfig, TwinService


@pytest.fixture(params=["mosquitto", "amqtt"])
def any_broker(request):
    """The test runs twice: on Debian's Mosquitto and on the built-in amqtt broker."""
    if request.param == "mosquitto":
        yield request.getfixturevalue("broker")
        return
    with EmbeddedBroker() as server:
        yield server


@pytest.fixture
def start_twin(tmp_path):
    """`start_twin(port, client_id=..., **TwinConfig fields)`: a twin on that broker with its history in
    tmp_path/twin.db, connected when it returns. Every twin started is stopped after the test (stop is
    idempotent, so a test may stop and start its twin again itself)."""
    started: list[TwinService] = []

    def start(port: int, *, client_id: str, **config) -> TwinService:
        service = TwinService(config=TwinConfig(broker_port=port, db=str(tmp_path / "twin.db"), client_id=client_id,
                                                **config)).start()
        started.append(service)
        service.wait_connected()
        return service

    yield start
    for service in reversed(started):
        service.stop()


class AckedPublisher:
    """Publishes at QoS 1 and records which (device, serial) the broker acknowledged (PUBACK)."""

    def __init__(self, port: int, client_id: str):
        self.lock = threading.Lock()
        self.pending: dict[int, tuple[str, int] | None] = {}
        self.acked: set[tuple[str, int]] = set()
        self.client = BurstClient(config=BurstClientConfig(port=port, client_id=client_id, keepalive_s=5),
                                  on_acked=self._on_acked).start()
        self.client.wait_connected()

    def _on_acked(self, mids):
        with self.lock:
            for mid in mids:
                key = self.pending.pop(mid, None)
                if key is not None:
                    self.acked.add(key)

    def send(self, messages: list[tuple[str, bytes]], keys: list[tuple[str, int] | None] | None = None):
        with self.lock:  # the PUBACK may come back before publish_many returns: record under the same lock
            mids = self.client.publish_many(messages, qos=1)
            for mid, key in zip(mids, keys or [None] * len(mids), strict=True):
                self.pending[mid] = key

    def wait_all_acked(self, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.client.inflight:
            time.sleep(0.02)
        assert self.client.inflight == 0, "timed out waiting for the broker's PUBACKs"

    def stop(self):
        self.client.stop()


@pytest.fixture
def publisher():
    """`publisher(port, client_id)`: an AckedPublisher, connected; every one is stopped after the test."""
    started: list[AckedPublisher] = []

    def start(port: int, client_id: str) -> AckedPublisher:
        started.append(AckedPublisher(port, client_id))
        return started[-1]

    yield start
    for edge in started:
        edge.stop()


@pytest.fixture(scope="module")
def postgres_url():
    """MOEWORKS_TEST_PG_URL (CI starts a server), else a throwaway cluster; skip only when neither works."""
    url = os.environ.get("MOEWORKS_TEST_PG_URL")
    if url:
        yield url
        return
    try:
        cluster = PostgresCluster().start()
    except (ServiceError, OSError) as exc:
        pytest.skip(f"no PostgreSQL server could be started: {exc}")
    yield cluster.url
    cluster.stop()
