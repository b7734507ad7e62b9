"""Fixtures the twin's tests share: the brokers a test runs against, twins started on them, publishers that
record which messages the broker acknowledged, a PostgreSQL server and new databases on it. (`broker`, a plain
Mosquitto, is tests/conftest.py's.)"""

from __future__ import annotations

import os
import threading

import pytest

from tests.polling import wait_for
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
        wait_for(lambda: self.client.inflight == 0, timeout, "the broker's PUBACKs", interval=0.02)

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


@pytest.fixture
def database_url(request, tmp_path):
    """`database_url(dialect, name)`: a new place for a store's tables, "sqlite" (a file in tmp_path) or
    "postgresql" (database `name` on postgres_url's server, dropped first if an earlier run left it). The server is
    asked for only then, so SQLite runs need none."""
    def make(dialect: str, name: str) -> str:
        if dialect == "sqlite":
            return str(tmp_path / "twin.db")
        import psycopg

        base = request.getfixturevalue("postgres_url")
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name}")
        return base.rsplit("/", 1)[0] + "/" + name

    return make
