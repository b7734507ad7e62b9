"""MQTT security against real brokers: Debian's Mosquitto run with the config `moeworks twin
mosquitto-config` writes, and the built-in amqtt broker with its password file and TLS listener.

Certificates are made at test time (tests/mqtt_certs.py). Clients under test: the twin's own
(twin.mqtt.burst_client), the edge agent's (paho), and the command lines.
"""

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy.edge.agent import EdgeAgent, EdgeConfig
from deploy.edge.sources import SimulatedMill
from tests.mqtt_certs import PKI, issue, make_ca, make_pki
from tests.polling import wait_for
from tests.services import EmbeddedBroker, Mosquitto, free_port, wait_port
from twin.domain.plant import Plant
from twin.mqtt.broker_passwd import set_password
from twin.mqtt.burst_client import BurstClient, BurstClientConfig
from twin.mqtt.mosquitto_config import MosquittoSecurity, write_mosquitto_security
from twin.mqtt.security import MQTTSecurity, MQTTSecurityError
from twin.service import TwinConfig, TwinService

ROOT = Path(__file__).resolve().parents[3]
TWIN_USER = "moeworks-twin"
NODES = ("edge-cell-1", "edge-cell-2", "edge-mill-1", "edge-mill-2")  # the demo plant's edge nodes
needs_mosquitto = pytest.mark.skipif(not (shutil.which("mosquitto") and shutil.which("mosquitto_passwd")),
                                     reason="mosquitto is not installed (apt-get install mosquitto; .ci/run does)")


class SecureBroker:
    """A running broker with TLS and passwords, and what a client needs to log in."""

    def __init__(self, kind: str, port: int, pki: PKI, passwords: dict[str, str]):
        self.kind, self.port, self.pki, self.passwords = kind, port, pki, passwords

    def login(self, user: str, *, password: str | None = None, ca: Path | None = None, **extra) -> MQTTSecurity:
        return MQTTSecurity(username=user, password=password or self.passwords[user], ca=ca or self.pki.ca, **extra)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def untrusted_ca(tmp_path_factory) -> Path:
    """A CA the brokers' certificates are not signed by."""
    return make_ca(tmp_path_factory.mktemp("other-ca"), name="someone else's CA")[0]


def _mosquitto(pki: PKI, folder: Path, **options):
    config = MosquittoSecurity(out=folder / "conf", certfile=pki.server_cert, keyfile=pki.server_key, cafile=pki.ca,
                               group="plant1", nodes=NODES, twin_user=TWIN_USER, message_size_limit=16 * 1024,
                               **options)
    paths = write_mosquitto_security(config)
    passwords = {user: (paths["credentials"] / f"{user}.password").read_text().strip() for user in config.users}
    return Mosquitto(workdir=folder / "run", security=config), passwords


@pytest.fixture(params=["mosquitto", "amqtt"])
def secure_broker(request, pki, tmp_path):
    if request.param == "mosquitto":
        if not (shutil.which("mosquitto") and shutil.which("mosquitto_passwd")):
            pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
        broker, passwords = _mosquitto(pki, tmp_path)
    else:
        passwords = {user: f"pw-{user}-{os.urandom(4).hex()}" for user in (TWIN_USER, *NODES)}
        for user, password in passwords.items():
            set_password(tmp_path / "broker_passwd", user, password)
        broker = EmbeddedBroker(password_file=tmp_path / "broker_passwd", certfile=pki.server_cert,
                                keyfile=pki.server_key, cafile=pki.ca)
    with broker:
        yield SecureBroker(request.param, broker.port, pki, passwords)


def burst_client(broker: SecureBroker, security: MQTTSecurity | None, client_id: str, **kwargs) -> BurstClient:
    return BurstClient(config=BurstClientConfig(port=broker.port, client_id=client_id, security=security,
                                                backoff_max_s=0.5), **kwargs).start()


def refused(broker: SecureBroker, security: MQTTSecurity | None, client_id: str) -> str:
    """Connect the twin's client with `security`; return why it could not get in."""
    client = burst_client(broker, security, client_id)
    try:
        wait_for(lambda: client.last_error or client.connected.is_set(), timeout=10, what="an answer")
        assert not client.connected.is_set(), "it got in"
        return client.last_error
    finally:
        client.stop()


def edge_agent(broker: SecureBroker, security: MQTTSecurity | None, tmp_path: Path, *, rows: int,
               node: str = "edge-mill-1", device: str = "mill-1", duration_s: float | None = None) -> EdgeAgent:
    return EdgeAgent(config=EdgeConfig(port=broker.port, node=node, device=device, rate_hz=400.0, keepalive_s=2,
                                       spool=tmp_path / f"{node}.spool", backoff_max_s=0.3, duration_s=duration_s,
                                       security=security),
                     source=SimulatedMill(seed=5, rows=rows))


@pytest.fixture
def secure_twin(secure_broker, start_twin):
    return start_twin(secure_broker.port, client_id=TWIN_USER, mqtt=secure_broker.login(TWIN_USER))


# ---------------------------------------------------------------------------------------------- refusals
def test_anonymous_clients_are_refused(secure_broker):
    assert "not authorised" in refused(secure_broker, MQTTSecurity(ca=secure_broker.pki.ca), "anon")
    # and without TLS a client does not even get to say who it is
    assert refused(secure_broker, None, "plaintext")


def test_a_wrong_password_is_refused_to_the_twin_and_to_an_edge_agent(secure_broker, tmp_path):
    reason = refused(secure_broker, secure_broker.login(TWIN_USER, password="not-the-password"), "twin-guess")
    assert "bad user name or password" in reason or "not authorised" in reason
    assert "not authorised" in refused(secure_broker, secure_broker.login("nobody", password="x"), "stranger")
    stats = edge_agent(secure_broker, secure_broker.login("edge-mill-1", password="guess"), tmp_path, rows=50,
                       duration_s=1.5).run()
    assert stats["sessions"] == 0 and stats["reconnect_failures"] >= 1
    assert stats["spool_depth"] == stats["produced"] > 0, "refused, the edge keeps its data in the spool"


def test_a_broker_certificate_from_an_untrusted_ca_is_refused_by_the_clients(secure_broker, untrusted_ca, tmp_path):
    assert "CERTIFICATE_VERIFY_FAILED" in refused(secure_broker, secure_broker.login(TWIN_USER, ca=untrusted_ca),
                                                   "twin-untrusted")
    stats = edge_agent(secure_broker, secure_broker.login("edge-mill-1", ca=untrusted_ca), tmp_path, rows=20,
                       duration_s=1.0).run()
    assert stats["sessions"] == 0 and stats["reconnect_failures"] >= 1


def test_a_trusted_certificate_for_another_host_name_is_refused(pki, tmp_path):
    """Signed by the right CA but issued to another name: the clients check the name they dialled."""
    cert, key = issue(tmp_path, "elsewhere", pki.ca_certificate, pki.ca_key, server=True,
                      names=("broker.elsewhere.example",))
    set_password(tmp_path / "users", TWIN_USER, "pw")
    with EmbeddedBroker(password_file=tmp_path / "users", certfile=cert, keyfile=key) as server:
        broker = SecureBroker("amqtt", server.port, pki, {TWIN_USER: "pw", "edge-mill-1": "pw"})
        assert "CERTIFICATE_VERIFY_FAILED" in refused(broker, broker.login(TWIN_USER), "twin-wrong-name")
        stats = edge_agent(broker, broker.login("edge-mill-1"), tmp_path, rows=10, duration_s=1.0).run()
        assert stats["sessions"] == 0 and stats["reconnect_failures"] >= 1


# ---------------------------------------------------------------------------------------------- end to end
def test_the_twin_with_tls_and_auth_ingests_an_edge_agents_telemetry(secure_broker, secure_twin, tmp_path):
    stats = edge_agent(secure_broker, secure_broker.login("edge-mill-1"), tmp_path, rows=300).run()
    assert stats["produced"] == stats["acknowledged"] == 300 and stats["spool_depth"] == 0
    wait_for(lambda: secure_twin.committed >= 300, what="history")
    secure_twin.store.flush()
    assert secure_twin.store.seqs("mill-1") == list(range(300))
    assert secure_twin.state.nodes["edge-mill-1"].bd_seq == 0


@pytest.mark.parametrize("secure_broker", ["mosquitto"], indirect=True)  # the built-in broker has no ACL
def test_under_the_acl_an_edge_node_cannot_publish_another_nodes_topics_nor_the_twin_telemetry(
        secure_broker, secure_twin, tmp_path):
    broker, twin = secure_broker, secure_twin
    seen: list[tuple[str, bytes]] = []
    watcher = burst_client(broker, broker.login(TWIN_USER), "acl-watcher", on_messages=seen.extend,
                           subscriptions=(("spBv1.0/plant1/#", 1),))
    try:
        watcher.wait_connected()
        time.sleep(0.3)  # the SUBACK
        spoof = b'{"timestamp":%d,"seq":0,"metrics":[{"name":"torque","value":99.0}]}' % int(time.time() * 1000)
        acked: list[int] = []
        for user, client_id in (("edge-mill-1", "attacker"), (TWIN_USER, "twin-as-publisher")):
            attacker = burst_client(broker, broker.login(user), client_id, on_acked=acked.extend)
            attacker.wait_connected()
            # node edge-mill-1 speaks for edge-mill-2; the twin's user publishes telemetry
            attacker.publish_many([("spBv1.0/plant1/NBIRTH/edge-mill-2", b'{"timestamp":1,"seq":0,"bdSeq":9}'),
                                   ("spBv1.0/plant1/DDATA/edge-mill-2/mill-2", spoof)], qos=1)
            wait_for(lambda: len(acked) >= 2, what="the broker's PUBACKs")  # acknowledged, and dropped
            attacker.stop()
            acked.clear()
        too_big = burst_client(broker, broker.login("edge-mill-1"), "too-big")
        too_big.wait_connected()
        too_big.publish("spBv1.0/plant1/DDATA/edge-mill-1/mill-1", b"x" * (17 * 1024))  # > message_size_limit
        time.sleep(0.5)
        too_big.stop()
        # node edge-mill-1 on its own topics gets through, after all of the above
        stats = edge_agent(broker, broker.login("edge-mill-1"), tmp_path, rows=50).run()
        assert stats["acknowledged"] == 50
        wait_for(lambda: twin.committed >= 50, what="edge-mill-1's rows")
        wait_for(lambda: sum("/DDATA/edge-mill-1/" in t for t, _ in seen) == 50, what="the watcher")
    finally:
        watcher.stop()
    assert not [t for t, _ in seen if "edge-mill-2" in t], "nothing published for edge-mill-2 reached a subscriber"
    assert all(len(p) < 16 * 1024 for _, p in seen), "the oversized message was dropped by the broker"
    assert twin.state.devices["mill-2"].messages == 0 and twin.state.nodes["edge-mill-2"].bd_seq is None
    assert twin.state.counters["dead_letter"] == 0, "nothing refused by the twin: the broker kept it out"
    # nor read them: Mosquitto grants the subscription and delivers nothing the user may not read
    overheard: list[tuple[str, bytes]] = []
    stranger = burst_client(broker, broker.login("edge-mill-1"), "curious", on_messages=overheard.extend,
                            subscriptions=(("spBv1.0/plant1/#", 1),))
    neighbour = burst_client(broker, broker.login("edge-mill-2"), "neighbour")
    try:
        stranger.wait_connected()
        neighbour.wait_connected()
        time.sleep(0.3)  # the SUBACK
        received = twin.state.counters["received"]
        neighbour.publish("spBv1.0/plant1/NBIRTH/edge-mill-2", b'{"timestamp":%d,"seq":0,"bdSeq":0}'
                          % int(time.time() * 1000), qos=1)
        wait_for(lambda: twin.state.counters["received"] > received, what="the neighbour's birth at the twin")
        time.sleep(0.3)
    finally:
        neighbour.stop()
        stranger.stop()
    assert overheard == []


@needs_mosquitto
def test_a_client_certificate_when_the_broker_requires_one(pki, tmp_path):
    mosquitto, passwords = _mosquitto(pki, tmp_path, require_certificate=True)
    with mosquitto:
        broker = SecureBroker("mosquitto", mosquitto.port, pki, passwords)
        assert refused(broker, broker.login("edge-mill-1"), "no-cert")  # the password alone is not enough
        client = burst_client(broker, broker.login("edge-mill-1", cert=pki.client_cert, key=pki.client_key),
                              "with-cert")
        try:
            client.wait_connected()
        finally:
            client.stop()


# ---------------------------------------------------------------------------------------------- configs and CLI
def test_security_config_refuses_what_cannot_work(pki, tmp_path, monkeypatch):
    with pytest.raises(MQTTSecurityError, match="--mqtt-key"):
        MQTTSecurity(cert=pki.client_cert)
    with pytest.raises(MQTTSecurityError, match="needs a username"):
        MQTTSecurity(password="x")
    with pytest.raises(MQTTSecurityError, match="no such file"):
        MQTTSecurity(ca=tmp_path / "missing.crt")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(MQTTSecurityError, match="empty"):
        MQTTSecurity.from_options(username="u", password_file=tmp_path / "empty")
    (tmp_path / "pw").write_text("s3cret\nsecond line ignored\n")
    assert MQTTSecurity.from_options(username="u", password_file=tmp_path / "pw").password == "s3cret"
    assert MQTTSecurity.from_options(username="u", environ={"MOEWORKS_MQTT_PASSWORD": "env"}).password == "env"
    assert "s3cret" not in repr(MQTTSecurity(username="u", password="s3cret"))
    with pytest.raises(MQTTSecurityError, match="cannot load"):  # a certificate whose key is another's
        MQTTSecurity(cert=pki.client_cert, key=pki.server_key).ssl_context()


@needs_mosquitto
def test_mosquitto_config_command_writes_private_credentials_and_per_node_rules(pki, tmp_path):
    from deploy.cli import app

    out = tmp_path / "mqtt"
    args = ["twin", "mosquitto-config", "--out", str(out), "--mqtt-ca", str(pki.ca), "--mqtt-cert",
            str(pki.server_cert), "--mqtt-key", str(pki.server_key)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    nodes = sorted(Plant.from_yaml().nodes)
    credentials = {p.stem: p for p in (out / "credentials").glob("*.password")}
    assert sorted(credentials) == sorted([TWIN_USER, *nodes])
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in [*credentials.values(), out / "passwd"])
    first = credentials["edge-mill-1"].read_text()
    passwd = (out / "passwd").read_text()
    assert first.strip() not in passwd and passwd.count("$7$") == len(credentials), "only hashes in passwd"
    acl = (out / "acl").read_text()
    assert "topic write spBv1.0/plant1/DDATA/edge-mill-1/+" in acl and "pattern" not in acl
    conf = (out / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "listener 8883 127.0.0.1", "message_size_limit 262144",
                 f"cafile {pki.ca}", "require_certificate false"):
        assert line in conf
    assert CliRunner().invoke(app, args).exit_code == 0
    assert credentials["edge-mill-1"].read_text() == first, "a second run keeps the passwords already handed out"
    bad = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "missing.key")])
    assert bad.exit_code == 2 and "no such file" in bad.output


def test_cli_options_are_checked_before_anything_starts(pki, tmp_path):
    from deploy.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["edge", "run", "--max-messages", "1", "--mqtt-username", "edge-mill-1",
                                  "--mqtt-password-file", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "cannot read the MQTT password file" in missing.output
    half = runner.invoke(app, ["twin", "serve", "--mqtt-cert", str(pki.client_cert)])
    assert half.exit_code == 2 and "--mqtt-key" in half.output
    exposed = runner.invoke(app, ["twin", "broker", "--host", "0.0.0.0", "--port", str(free_port())])
    assert exposed.exit_code == 2 and "refusing to bind 0.0.0.0" in exposed.output
    users = tmp_path / "broker_passwd"
    added = runner.invoke(app, ["twin", "broker-passwd", "--file", str(users), "--username", "edge-mill-1"],
                          env={"MOEWORKS_MQTT_PASSWORD": "s3cret"})
    assert added.exit_code == 0, added.output
    line = users.read_text()
    assert line.startswith("edge-mill-1:$argon2") and "s3cret" not in line
    assert stat.S_IMODE(users.stat().st_mode) == 0o600


@pytest.mark.slow
def test_command_lines_end_to_end_built_in_broker_tls_and_passwords(pki, tmp_path):
    """`twin broker` with TLS and a password file, `edge run` with the --mqtt-* options, the twin."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MOEWORKS_MQTT_PASSWORD", None)
    node = "edge-mill-1"
    for user in (TWIN_USER, "edge-mill-1"):
        (tmp_path / f"{user}.password").write_text(f"pw-{user}\n")
        assert subprocess.run([sys.executable, "-m", "deploy.cli", "twin", "broker-passwd", "--file",
                               str(tmp_path / "users"), "--username", user, "--mqtt-password-file",
                               str(tmp_path / f"{user}.password")], cwd=ROOT, env=env, timeout=120).returncode == 0
    port = free_port()
    broker = subprocess.Popen([sys.executable, "-m", "deploy.cli", "twin", "broker", "--port", str(port),
                               "--password-file", str(tmp_path / "users"), "--mqtt-cert", str(pki.server_cert),
                               "--mqtt-key", str(pki.server_key)], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    twin = None
    try:
        wait_port(port, timeout=60)
        twin = TwinService(config=TwinConfig(broker_port=port, db=str(tmp_path / "twin.db"), client_id=TWIN_USER,
                                             mqtt=MQTTSecurity(username=TWIN_USER, password=f"pw-{TWIN_USER}",
                                                               ca=pki.ca))).start()
        twin.wait_connected()
        edge = subprocess.run([sys.executable, "-m", "deploy.cli", "edge", "run", "--source", "sim-mill", "--rate",
                               "200", "--max-messages", "100", "--broker-port", str(port), "--node", "edge-mill-1",
                               "--device", "mill-1", "--spool", str(tmp_path / "edge.spool"), "--json",
                               "--mqtt-username", "edge-mill-1", "--mqtt-ca", str(pki.ca)],
                              cwd=ROOT, env=dict(env, MOEWORKS_MQTT_PASSWORD_FILE=str(tmp_path / f"{node}.password")),
                              capture_output=True, text=True, timeout=120)
        assert edge.returncode == 0, edge.stderr[-2000:]
        assert "(TLS)" in edge.stderr and '"acknowledged": 100' in edge.stdout
        wait_for(lambda: twin.committed >= 100, what="the edge's rows")
        twin.store.flush()
        assert twin.store.seqs("mill-1") == list(range(100))
    finally:
        if twin is not None:
            twin.stop()
        broker.terminate()
        _, err = broker.communicate(timeout=30)
    assert broker.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]


def test_tls_reads_and_concurrent_publishes_keep_every_message(secure_broker):
    """OpenSSL connections must not be read and written from two threads at once: the twin's client
    reads on its thread while publishers write on theirs. Large and small messages, both ways."""
    inbox: list[tuple[str, bytes]] = []
    sub = burst_client(secure_broker, secure_broker.login(TWIN_USER), TWIN_USER, on_messages=inbox.extend,
                       subscriptions=(("spBv1.0/plant1/#", 1),))
    pub = burst_client(secure_broker, secure_broker.login("edge-mill-1"), "edge-mill-1-load")
    try:
        sub.wait_connected()
        pub.wait_connected()
        time.sleep(0.3)
        payloads = [bytes([i % 251]) * (1 + (i * 37) % 15_000) for i in range(1_500)]
        topic = "spBv1.0/plant1/DDATA/edge-mill-1/mill-1"
        echo = threading.Thread(target=lambda: [sub.publish("spBv1.0/plant1/NCMD/edge-mill-1", b"c" * 2000, qos=1)
                                                for _ in range(300)])
        echo.start()  # the subscriber writes while it reads
        for i in range(0, len(payloads), 50):
            pub.publish_many([(topic, p) for p in payloads[i:i + 50]], qos=1)
        echo.join()
        wait_for(lambda: len([1 for t, _ in inbox if t == topic]) == len(payloads), what="every message")
        assert [p for t, p in inbox if t == topic] == payloads
        wait_for(lambda: pub.inflight == 0 and sub.inflight == 0, what="every PUBACK")
        assert sub.connections == 1 and pub.connections == 1
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.slow
def test_the_demo_over_tls_with_a_password_per_client(pki, tmp_path):
    from rich.console import Console

    from deploy.twin_demo import run_twin_demo

    # 6 s: five argon2 logins (0.3-1.5 s each on 2 loaded cores, two at a time) come before any data
    summary = run_twin_demo(tmp_path / "demo", duration_s=6.0, rate_hz=20.0, quick=True,
                            console=Console(quiet=True),
                            broker_tls=(pki.server_cert, pki.server_key, pki.ca))
    users = (tmp_path / "demo" / "mqtt" / "broker_passwd").read_text()
    assert users.count(":$argon2") == 1 + len(Plant.from_yaml().nodes)
    assert summary["agents"] and all(a["sessions"] == 1 and a["reconnect_failures"] == 0 and a["acknowledged"] > 0
                                     for a in summary["agents"].values())
    assert summary["history_rows"] == sum(a["acknowledged"] for a in summary["agents"].values())
