"""The twin as several workers (twin/scaleout/worker.py) on real Mosquitto and real PostgreSQL: every row once
with two workers, a worker SIGKILLed mid-stream (0 lost, 0 duplicated, alarms raised once), the same
API answers from either worker; the built-in broker (no shared subscriptions) refused with exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests import polling
from twin.scaleout.ownership import owner_of
from twin.scaleout.reorder import apply_order
from twin.scaleout.worker import HOST

ROOT = Path(__file__).resolve().parents[3]
GROUP = "bench"


wait_for = partial(polling.wait_for, timeout=30.0)


def ddata(serial: int, torque: float = 40.0) -> bytes:
    return json.dumps({"timestamp": int(time.time() * 1000), "seq": serial % 256, "serial": serial, "metrics": [
        {"name": "product_type", "value": "L"}, {"name": "air_temperature", "value": 300.0},
        {"name": "process_temperature", "value": 310.0}, {"name": "rotational_speed", "value": 1500.0},
        {"name": "torque", "value": torque}, {"name": "tool_wear", "value": 10.0}]}).encode()


# ------------------------------------------------------------------------------------------- no services
def test_apply_order_puts_each_devices_data_in_serial_order_births_first_deaths_last():
    t = f"spBv1.0/{GROUP}/DDATA/n0/m0"
    u = f"spBv1.0/{GROUP}/DDATA/n0/m1"
    birth = (f"spBv1.0/{GROUP}/DBIRTH/n0/m0", b'{"timestamp":1,"seq":5,"serial":5}')
    nbirth = (f"spBv1.0/{GROUP}/NBIRTH/n0", b'{"timestamp":1,"seq":0,"bdSeq":1}')
    death = (f"spBv1.0/{GROUP}/NDEATH/n0", b'{"bdSeq":1}')
    garbage = (t, b"not json")
    five = (t, ddata(5))
    received = [(t, ddata(7)), death, (u, ddata(3)), five, garbage, birth, (t, ddata(6)), nbirth, (u, ddata(2))]
    ordered = apply_order(received)
    assert sorted(ordered) == sorted(received)  # nothing lost or added
    assert ordered[0] == nbirth and ordered[-1] == death
    m0 = [json.loads(raw).get("serial") for topic, raw in ordered if topic.endswith("/m0") and raw != b"not json"]
    assert m0 == [5, 5, 6, 7] and ordered.index(birth) < ordered.index(five)  # the birth before its data
    assert [json.loads(raw)["serial"] for topic, raw in ordered if topic == u] == [2, 3]
    assert ordered.index(garbage) == received.index(garbage)  # kept in place (NBIRTH in, NDEATH out before it)


def test_rendezvous_moves_only_the_nodes_of_a_worker_that_leaves():
    nodes = [f"n{i:04d}" for i in range(200)]
    three = {n: owner_of(n, ["w0", "w1", "w2"]) for n in nodes}
    two = {n: owner_of(n, ["w0", "w2"]) for n in nodes}
    assert {n for n in nodes if three[n] != two[n]} == {n for n in nodes if three[n] == "w1"}
    assert 40 < sum(o == "w1" for o in three.values()) < 95  # a fair share, roughly


# ------------------------------------------------------------------------------------------- real services
@pytest.fixture
def postgres():
    from tests.services import PostgresCluster, ServiceError

    try:
        cluster = PostgresCluster()
    except ServiceError as exc:
        pytest.skip(str(exc))
    with cluster:
        yield cluster


class Worker:
    """`python -m twin.scaleout.worker` with its API on a free port, so that the test can SIGKILL it."""

    def __init__(self, tmp_path: Path, name: str, broker_port: int, db: str, *, machines: int | None, nodes: int,
                 client_id: str = "twin-so", http_port: int | None = None, **extra):
        """`machines` None: the default plant (twin/domain/plant.yaml), that of the edge agent. `extra`: more of
        the worker's CONFIG (rollout, auth_file, https_cert, https_key)."""
        from tests.services import free_port, wait_port

        self.http = http_port or free_port()
        plant = {"generated_plant": {"machines": machines, "nodes": nodes}} if machines is not None else {}
        config = {"broker_port": broker_port, "db": db, "client_id": client_id, "work_orders_csv": None,
                  "keepalive_s": 2, **plant,
                  "scale": {"worker": name, "slots": 2, "home_slot": int(name[-1]), "lease_s": 1.5},
                  "http_port": self.http, **extra}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        self.log = (tmp_path / f"{name}.log").open("ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen([sys.executable, "-m", "twin.scaleout.worker", str(path)], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=self.log)
        assert self.process.stdout.readline().strip() == b"ready", (tmp_path / f"{name}.log").read_text()
        wait_port(self.http)

    def get(self, path: str):
        response = httpx.get(f"http://127.0.0.1:{self.http}{path}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)


@pytest.mark.slow
def test_two_workers_store_every_row_once_and_survive_a_sigkill(broker, postgres, publisher, tmp_path):
    machines, nodes, per_device = 8, 4, 120
    devices = [f"m{i:05d}" for i in range(machines)]
    alarming = devices[:3]  # their torque goes over the plant's 70 Nm limit at serial 30 and stays there
    workers = [Worker(tmp_path, f"w{k}", broker.port, postgres.url, machines=machines, nodes=nodes) for k in (0, 1)]
    edge = publisher(broker.port, "edge-so")
    import psycopg

    db = psycopg.connect(postgres.url, autocommit=True)
    try:
        wait_for(lambda: db.execute("SELECT COUNT(*) FROM twin_node_leases WHERE holder IS NOT NULL "
                                    "AND node NOT IN ('', %s)", (HOST,)).fetchone()[0] == nodes
                 and len({r[0] for r in db.execute("SELECT holder FROM twin_slots WHERE holder IS NOT NULL")}) == 2,
                 what="both workers holding a slot and the nodes owned")
        now = int(time.time() * 1000)
        edge.send([(f"spBv1.0/{GROUP}/NBIRTH/n{n:04d}", json.dumps({"timestamp": now, "seq": 0, "bdSeq": 0}).encode())
                   for n in range(nodes)])
        edge.send([(f"spBv1.0/{GROUP}/DBIRTH/n{i % nodes:04d}/{d}",
                    json.dumps({"timestamp": now, "seq": 0, "serial": 0}).encode()) for i, d in enumerate(devices)])

        def stream(serials):
            for s in serials:
                edge.send([(f"spBv1.0/{GROUP}/DDATA/n{i % nodes:04d}/{d}",
                            ddata(s, 80.0 if d in alarming and s >= 30 else 40.0)) for i, d in enumerate(devices)],
                          keys=[(d, s) for d in devices])
                time.sleep(0.02)  # ~400 msg/s

        stream(range(0, 60))
        wait_for(lambda: db.execute("SELECT COUNT(*) FROM history").fetchone()[0] >= 60 * machines // 2,
                 what="the first half flowing")

        def shares():
            rows = db.execute("SELECT stats FROM twin_workers").fetchall()
            return [json.loads(r[0]) for r in rows if r[0] and r[0] != "{}"]
        # the broker deals the stream to both workers, and both apply the nodes they own
        wait_for(lambda: len(shares()) == 2 and all(s["received"] > 0 and s["applied"] > 0 for s in shares()),
                 what="both workers receiving and applying")
        workers[1].stop(signal.SIGKILL)  # mid-stream, with rows received but not yet committed or applied
        stream(range(60, per_device))
        wait_for(lambda: len(edge.acked) == machines * per_device, what="every DDATA acknowledged by the broker")
        wait_for(lambda: db.execute("SELECT COUNT(*) FROM history").fetchone()[0] == machines * per_device,
                 timeout=60, what="every acknowledged row in history (the dead worker's session adopted)")
        stored = db.execute("SELECT device, seq FROM history").fetchall()
        assert len(stored) == len(set(stored)) and set(stored) == edge.acked  # 0 lost, 0 duplicated
        wait_for(lambda: db.execute("SELECT COUNT(*) FROM twin_inbox").fetchone()[0] == 0, what="the inbox drained")
        twice = db.execute("SELECT device, kind, metric, COUNT(*) FROM alarms GROUP BY device, kind, metric "
                           "HAVING COUNT(*) > 1").fetchall()
        assert twice == []  # no alarm raised twice, across the kill and the takeover
        raised = {r[0] for r in db.execute("SELECT device FROM alarms WHERE kind = 'limit_high' AND metric = 'torque'")}
        assert raised == set(alarming)
        # the killed worker comes back (as the supervisor restarts it) and takes its share again
        workers[1] = Worker(tmp_path, "w1", broker.port, postgres.url, machines=machines, nodes=nodes)
        wait_for(lambda: len({r[0] for r in db.execute("SELECT holder FROM twin_node_leases WHERE holder IS NOT NULL "
                                                       "AND node NOT IN ('', %s)", (HOST,))}) == 2,
                 what="the nodes shared again")
        time.sleep(1.0)  # a lease round: the snapshots of the moved nodes written

        def view(worker):
            assets = {a["id"]: (a["online"], a["values"].get("torque"), a["last_seq"], a["active_alarms"])
                      for a in worker.get("/api/assets")}
            alarms = sorted((a["device"], a["kind"], a["metric"], a["state"]) for a in worker.get("/api/alarms"))
            history = [r["seq"] for r in worker.get(f"/api/assets/{devices[0]}/history?limit=100000")]
            return assets, alarms, history

        first, second = view(workers[0]), view(workers[1])
        assert first == second
        assets, alarms, history = first
        assert history == list(range(per_device))
        assert all(online and last == per_device - 1 for online, _, last, _ in assets.values()), assets
        assert {d for d, (_, torque, _, _) in assets.items() if torque == 80.0} == set(alarming)
        assert {(d, k, m) for d, k, m, _ in alarms} >= {(d, "limit_high", "torque") for d in alarming}
        # an acknowledgement through one worker's API is the alarm's state through the other's
        alarm_id = next(a["id"] for a in workers[0].get("/api/alarms") if a["device"] == alarming[0]
                        and a["kind"] == "limit_high")
        acked = httpx.post(f"http://127.0.0.1:{workers[1].http}/api/alarms/{alarm_id}/ack", timeout=10)
        assert acked.status_code == 200 and acked.json()["state"] == "ACTIVE_ACK"
        time.sleep(1.0)  # the owner's lease round picks it up; its later writes keep it
        assert next(a for a in workers[0].get("/api/alarms") if a["id"] == alarm_id)["state"] == "ACTIVE_ACK"
        stats = workers[0].get("/api/stats")
        assert {w["worker"] for w in stats["workers"]} == {"w0", "w1"}
        assert stats["counters"].get("internal_error", 0) == 0
    finally:
        db.close()
        edge.client.stop()
        for worker in workers:
            worker.stop()


@pytest.mark.slow
def test_one_worker_at_a_time_is_the_primary_host_and_edges_hold_data_while_none_is_up(broker, postgres, tmp_path):
    """Sparkplug's STATE with N workers: one holder publishes online, its SIGKILL publishes its will (offline) and
    the survivor online again (newer); the last worker's clean stop says offline. An edge agent following the
    host holds its data while offline and delivers all of it afterwards: 0 lost."""
    import threading

    import orjson
    import paho.mqtt.client as mqtt
    import psycopg

    from deploy.edge.agent import EdgeAgent, EdgeConfig
    from deploy.edge.sources import SimulatedMill

    host, topic = "twin-so-host", "spBv1.0/STATE/twin-so-host"
    seen: list[tuple[str, dict | None]] = []  # (topic, STATE) of everything the group's namespace carries
    observer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="observer-state")
    observer.on_message = lambda c, u, m: seen.append((m.topic, orjson.loads(m.payload) if m.topic == topic
                                                       else None))
    observer.connect("127.0.0.1", broker.port)
    observer.loop_start()
    observer.subscribe([(topic, 1), ("spBv1.0/plant1/DDATA/#", 1)])
    states = lambda: [doc for t, doc in seen if t == topic]  # noqa: E731
    ddata = lambda: sum(t != topic for t, _ in seen)  # noqa: E731
    workers = [Worker(tmp_path, f"w{k}", broker.port, postgres.url, machines=None, nodes=0, client_id=host)
               for k in (0, 1)]
    db = psycopg.connect(postgres.url, autocommit=True)
    agent = EdgeAgent(config=EdgeConfig(port=broker.port, node="edge-mill-1", device="mill-1", rate_hz=100.0,
                                        keepalive_s=2, spool=tmp_path / "edge.spool", backoff_max_s=0.5,
                                        primary_host=host), source=SimulatedMill(seed=3, rows=1200))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(agent.run()))
    try:
        wait_for(lambda: states() and states()[-1]["online"], what="a worker publishing the host online")
        thread.start()
        wait_for(lambda: db.execute("SELECT COUNT(*) FROM history").fetchone()[0] > 100, what="data flowing")
        (holder,) = db.execute("SELECT holder FROM twin_node_leases WHERE node = %s", (HOST,)).fetchone()
        first = states()[-1]
        workers[int(holder[-1])].stop(signal.SIGKILL)
        wait_for(lambda: len(states()) >= 3 and states()[-1]["online"], what="the survivor publishing online")
        assert states()[-3:] == [first, {"online": False, "timestamp": first["timestamp"]}, states()[-1]], \
            "the killed holder's will, then the survivor's online"
        assert states()[-1]["timestamp"] > first["timestamp"], "newer than the will: the edges take it"
        survivor = workers[1 - int(holder[-1])]
        assert db.execute("SELECT holder FROM twin_node_leases WHERE node = %s", (HOST,)).fetchone()[0] != holder
        wait_for(lambda: db.execute("SELECT COUNT(*) FROM history").fetchone()[0] > 400, what="data after the kill")
        survivor.stop()  # the last worker, a clean stop: offline, retained
        wait_for(lambda: not states()[-1]["online"], what="the last worker's offline")
        assert states()[-1] == {"online": False, "timestamp": states()[-2]["timestamp"]}
        time.sleep(0.5)  # what was in flight lands
        held_from = ddata()
        time.sleep(1.5)
        assert ddata() == held_from, "no data while no worker is up"
        assert thread.is_alive(), "the agent holds its rows in its spool meanwhile"
        workers.append(Worker(tmp_path, "w0", broker.port, postgres.url, machines=None, nodes=0, client_id=host))
        thread.join(timeout=90)
        assert result["produced"] == 1200 and result["spool_depth"] == 0
        wait_for(lambda: db.execute("SELECT COUNT(*) FROM history WHERE device = 'mill-1'").fetchone()[0] == 1200,
                 timeout=60, what="the held rows stored")
        seqs = [r[0] for r in db.execute("SELECT seq FROM history WHERE device = 'mill-1' ORDER BY seq")]
        assert seqs == list(range(1200)), "0 lost, 0 duplicated"
        assert [s["online"] for s in states()[-2:]] == [False, True]
        online = [s["timestamp"] for s in states() if s["online"]]
        assert online == sorted(set(online)), "each holder's online newer than the one before"
        assert all(s["timestamp"] == online_before["timestamp"] for online_before, s in zip(states(), states()[1:],
                                                                                             strict=False)
                   if not s["online"]), "an offline names the session it ends"
    finally:
        thread.join(timeout=60) if thread.is_alive() else None
        observer.loop_stop()
        db.close()
        for worker in workers:
            worker.stop()


@pytest.mark.slow  # the probe waits its 5 s for a delivery that never comes
def test_the_built_in_broker_is_refused_for_several_workers(tmp_path):
    """amqtt 0.12 has no shared subscriptions: --workers 2 on it must stop at once, exit 2, one line."""
    from deploy.cli import app
    from tests.services import EmbeddedBroker

    with EmbeddedBroker() as amqtt:
        result = CliRunner().invoke(app, ["twin", "serve", "--workers", "2", "--broker-port", str(amqtt.port),
                                          "--db", "postgresql://nobody@127.0.0.1:1/none"])
    assert result.exit_code == 2
    assert "does not deliver MQTT shared subscriptions" in result.output and "Mosquitto" in result.output
    result = CliRunner().invoke(app, ["twin", "serve", "--workers", "2", "--db", str(tmp_path / "twin.db")])
    assert result.exit_code == 2 and "postgresql://" in result.output


def _two_free_ports() -> int:
    import socket

    from tests.services import free_port

    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.mark.slow
def test_serve_workers_starts_n_workers_and_restarts_one_that_is_killed(broker, postgres, tmp_path):
    """`twin serve --workers 2`: two worker processes, APIs on --http-port and +1, a SIGKILLed one restarted."""
    import psutil

    http = _two_free_ports()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "twin", "serve", "--workers", "2", "--db", postgres.url,
         "--broker-port", str(broker.port), "--http-port", str(http), "--work-orders-csv",
         str(tmp_path / "orders.csv")], cwd=tmp_path, env=env, stderr=(tmp_path / "serve.log").open("ab"))
    try:
        def answering(port):
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/stats", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(lambda: answering(http) and answering(http + 1), timeout=90, what="both workers' APIs")
        children = psutil.Process(supervisor.pid).children()
        assert len(children) == 2
        victim = next(c for c in children if f"{http + 1}" in " ".join(c.cmdline()))
        victim.kill()
        wait_for(lambda: len(psutil.Process(supervisor.pid).children()) == 2
                 and victim.pid not in [c.pid for c in psutil.Process(supervisor.pid).children()]
                 and answering(http + 1), timeout=90, what="the killed worker restarted")
        workers = httpx.get(f"http://127.0.0.1:{http}/api/stats", timeout=5).json()["workers"]
        assert {w["worker"] for w in workers} <= {"0", "1"} and workers
        children = psutil.Process(supervisor.pid).children()
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            for child in psutil.Process(supervisor.pid).children():
                child.kill()


@pytest.mark.slow
def test_shared_subscriptions_pass_the_generated_mosquitto_acl_with_tls_and_passwords(tmp_path):
    """`twin mosquitto-config`'s ACL gives the twin's user `spBv1.0/<group>/#` and STATE: Mosquitto checks a
    `$share/...` subscription against the filter without its prefix, so workers need no extra rule."""
    import shutil

    from tests.mqtt_certs import make_pki
    from tests.services import Mosquitto
    from twin.mqtt.mosquitto_config import MosquittoSecurity, write_mosquitto_security
    from twin.mqtt.security import MQTTSecurity
    from twin.scaleout.worker import share_probe
    from twin.service import TwinConfig

    if not (shutil.which("mosquitto") and shutil.which("mosquitto_passwd")):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    pki = make_pki(tmp_path / "pki")
    config = MosquittoSecurity(out=tmp_path / "conf", certfile=pki.server_cert, keyfile=pki.server_key,
                               cafile=pki.ca, group="plant1", nodes=("edge-mill-1",), twin_user="moeworks-twin")
    password = (write_mosquitto_security(config)["credentials"] / "moeworks-twin.password").read_text().strip()
    with Mosquitto(workdir=tmp_path / "run", security=config) as broker:
        login = MQTTSecurity(username="moeworks-twin", password=password, ca=pki.ca)
        share_probe(TwinConfig(broker_port=broker.port, mqtt=login, client_id="moeworks-twin"), "plant1-twin")
        with pytest.raises(ConnectionError):  # and the probe does not get in without the password
            share_probe(TwinConfig(broker_port=broker.port, mqtt=MQTTSecurity(ca=pki.ca, tls=True),
                                   client_id="moeworks-twin"), "plant1-twin", timeout_s=2.0)
