"""Signed model rollouts through twin workers (real Mosquitto, real PostgreSQL, HTTPS with tokens): started on one
worker's API, seen alike on every worker's, driven by one worker at a time; its SIGKILL mid-rollout hands the
rollout to the other, which finishes it from the stored rows, each node swapped once; a degraded model rolled
back by its canary's health gate stops the rollout the same way as on a single twin."""

# ruff: noqa: F811 - the fixtures `lab` and `postgres` are imported from the tests that define them
from __future__ import annotations

import signal
from functools import partial
from types import SimpleNamespace

import httpx
import pytest

from tests import polling
from tests.services import free_port
from tests.twin.rollout.test_rollout import MILLS, Agent, lab  # noqa: F401 - lab: the fixture, reused
from tests.twin.scaleout.test_scaleout import Worker, postgres  # noqa: F401 - postgres: the fixture, reused
from twin.auth import create_token
from twin.scaleout.ownership import owner_of
from twin.scaleout.worker import ROLLOUT

wait_for = partial(polling.wait_for, timeout=90.0, interval=0.2)
DONE = ("completed", "partial", "failed", "aborted")


class RolloutWorkers:
    """Two workers w0, w1 with rollout managers on one database and one bundle folder, each serving HTTPS."""

    def __init__(self, broker, postgres, tmp_path, lab):
        self.tmp, self.broker, self.lab, self.db = tmp_path, broker, lab, postgres.url
        tokens_file = tmp_path / "tokens.json"
        admin, viewer = (create_token(tokens_file, role=r, name=r) for r in ("admin", "viewer"))
        self.admin, self.viewer = ({"Authorization": f"Bearer {t}"} for t in (admin, viewer))
        self.ports = {name: free_port() for name in ("w0", "w1")}
        # which worker drives is the rendezvous of the lease key over the live workers: the edge nodes' URL names
        # the other (in a deployment, --rollout-url names a front that reaches a live worker)
        self.driver = owner_of(ROLLOUT, ["w0", "w1"])
        self.other = "w1" if self.driver == "w0" else "w0"
        self.extra = {"auth_file": str(tokens_file), "https_cert": str(lab.pki.server_cert),
                      "https_key": str(lab.pki.server_key),
                      "rollout": {"folder": str(tmp_path / "rollouts"), "publisher_key": str(lab.public),
                                  "base_url": f"https://127.0.0.1:{self.ports[self.other]}", "tick_s": 0.2,
                                  "resend_s": 1.0}}
        self.workers = {name: self.start(name) for name in ("w0", "w1")}
        self.http = {name: httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=str(lab.pki.ca), timeout=30)
                     for name, port in self.ports.items()}

    def start(self, name: str) -> Worker:
        return Worker(self.tmp, name, self.broker.port, self.db, machines=None, nodes=0, http_port=self.ports[name],
                      **self.extra)

    def get(self, worker: str, path: str):
        response = self.http[worker].get(path, headers=self.viewer)
        assert response.status_code == 200, response.text
        return response.json()

    def finished(self, worker: str, rollout_id: str):
        status = self.get(worker, f"/api/rollouts/{rollout_id}")
        return status if status["state"] in DONE else None

    def stop(self):
        for client in self.http.values():
            client.close()
        for worker in self.workers.values():
            worker.stop()


def _reported(cluster, worker: str, version: str) -> bool:
    models = {m["node"]: m for m in cluster.get(worker, "/api/edge-models")}
    return all(models[node]["model_version"] == version for node in MILLS)


@pytest.mark.slow
def test_rollout_through_two_workers_survives_a_sigkill_of_its_driver_and_rolls_back_a_degraded_model(
        broker, postgres, tmp_path, lab):
    import psycopg

    cluster = RolloutWorkers(broker, postgres, tmp_path, lab)
    agents = {}
    try:
        agents = {node: Agent(SimpleNamespace(broker=broker, tmp=tmp_path), lab, node) for node in MILLS}
        for name in ("w0", "w1"):  # the nodes' reports reach every worker's API (their owners' snapshots)
            wait_for(lambda name=name: _reported(cluster, name, lab.versions["v1"]), what=f"v1 seen by {name}")
        with psycopg.connect(cluster.db, autocommit=True) as conn:
            wait_for(lambda: conn.execute("SELECT holder FROM twin_node_leases WHERE node = %s AND expires_ms > "
                                          "(extract(epoch from clock_timestamp()) * 1000)::bigint",
                                          (ROLLOUT,)).fetchall() == [(cluster.driver,)], what="the rollout lease")

        # started on the worker that does not drive, canary share 0.5: one canary, then the other node
        response = cluster.http[cluster.other].post("/api/rollouts", headers=cluster.admin, json={
            "bundle": str(lab.bundles["v2"]), "nodes": list(MILLS), "canary": 0.5, "gate": {"rows": 40}})
        assert response.status_code == 201, response.text
        rollout_id = response.json()["id"]
        # the driver told the canary (its row says so on both workers); then it dies with the rollout half done
        told = wait_for(lambda: next((n for n in cluster.get(cluster.driver, f"/api/rollouts/{rollout_id}")["nodes"]
                                      if n["wave"] == "canary" and n["state"] != "pending"), None),
                        what="the canary told")
        before = cluster.get(cluster.other, f"/api/rollouts/{rollout_id}")
        cluster.workers[cluster.driver].stop(signal.SIGKILL)
        # killed with the canary wave running and the rest not yet told: what follows is the other worker's doing
        assert before["state"] == "canary", before
        assert [n["state"] for n in before["nodes"] if n["wave"] == "rest"] == ["pending"], before
        status = wait_for(lambda: cluster.finished(cluster.other, rollout_id), what="the rollout finished")
        assert status["state"] == "completed", status
        assert {n["node"]: (n["state"], n["version"]) for n in status["nodes"]} == {
            node: ("healthy", lab.versions["v2"]) for node in MILLS}
        assert told["wave"] == "canary"
        with psycopg.connect(cluster.db, autocommit=True) as conn:  # the lease moved to the survivor
            assert conn.execute("SELECT holder FROM twin_node_leases WHERE node = %s",
                                (ROLLOUT,)).fetchall() == [(cluster.other,)]
        # each node swapped once: v1 -> v2, v1 still its previous model (a second install would make it v2)
        wait_for(lambda: _reported(cluster, cluster.other, lab.versions["v2"]), what="v2 reported")
        for model in cluster.get(cluster.other, "/api/edge-models"):
            if model["node"] in MILLS:
                assert model["previous_version"] == lab.versions["v1"], model
                assert (model["rollout_id"], model["rollout_state"]) == (rollout_id, "healthy"), model
        for node, agent in agents.items():
            assert agent.slot.version == lab.versions["v2"], node

        # the killed worker comes back; a degraded model: the canary's gate rolls it back, the rest never told
        cluster.workers[cluster.driver] = cluster.start(cluster.driver)
        wait_for(lambda: _reported(cluster, cluster.driver, lab.versions["v2"]), what="the restarted worker reads")
        response = cluster.http[cluster.driver].post("/api/rollouts", headers=cluster.admin, json={
            "bundle": str(lab.bundles["bad"]), "nodes": list(MILLS), "canary": 0.5,
            "gate": {"rows": 30, "max_drift": 0.2}})
        assert response.status_code == 201, response.text
        bad_id = response.json()["id"]
        status = wait_for(lambda: cluster.finished(cluster.driver, bad_id), what="the degraded rollout stopped")
        assert status == cluster.get(cluster.other, f"/api/rollouts/{bad_id}")  # one state, whichever worker
        assert status["state"] == "failed", status
        nodes = {n["node"]: n for n in status["nodes"]}
        canary = next(n for n in nodes.values() if n["wave"] == "canary")
        rest = next(n for n in nodes.values() if n["wave"] == "rest")
        assert canary["state"] == "rolled_back" and "prediction drift" in canary["reason"], canary
        assert rest["state"] == "skipped", rest
        for agent in agents.values():  # the canary back on v2, the other never left it
            assert agent.slot.version == lab.versions["v2"]
    finally:
        for agent in agents.values():
            agent.stop()
        cluster.stop()


@pytest.mark.slow
def test_a_download_token_from_the_drivers_command_works_on_every_worker(broker, postgres, tmp_path,
                                                                          lab):
    """The files of a rollout started on one worker, fetched over HTTPS from each worker with the token of the
    NCMD the driver sent (read off the broker: no agent runs); no token, a wrong one or an unlisted name is refused
    by either. An abort taken by the worker that does not drive is not undone by the driver."""
    import threading
    import time

    from twin.mqtt.burst_client import BurstClient, BurstClientConfig
    from twin.rollout.protocol import RolloutCommand
    from twin.sparkplug.codec import decode

    cluster = RolloutWorkers(broker, postgres, tmp_path, lab)
    commands, lock = [], threading.Lock()

    def on_messages(messages):
        with lock:
            commands.extend(RolloutCommand.from_payload(decode("NCMD", raw)) for _, raw in messages)

    listener = BurstClient(config=BurstClientConfig(port=broker.port, client_id="ncmd-listener", keepalive_s=5),
                           subscriptions=(("spBv1.0/plant1/NCMD/edge-mill-1", 1),), on_messages=on_messages).start()
    try:
        listener.wait_connected()
        time.sleep(0.5)  # the SUBACK
        response = cluster.http[cluster.other].post("/api/rollouts", headers=cluster.admin, json={
            "bundle": str(lab.bundles["v2"]), "nodes": ["edge-mill-1"], "canary": 1.0, "gate": {"rows": 10}})
        assert response.status_code == 201, response.text
        rollout_id = response.json()["id"]
        command = wait_for(lambda: next((c for c in list(commands) if c and c.action == "install"), None),
                           what="the install NCMD")
        assert command.rollout_id == rollout_id
        assert command.url.startswith(f"https://127.0.0.1:{cluster.ports[cluster.other]}/")
        manifest = (lab.bundles["v2"] / "manifest.json").read_bytes()
        url = f"/api/rollouts/{rollout_id}/files/manifest.json"
        for name, client in cluster.http.items():
            got = client.get(url, headers={"Authorization": f"Bearer {command.token}"})
            assert got.status_code == 200 and got.content == manifest, (name, got.status_code)
            part = client.get(url, headers={"Authorization": f"Bearer {command.token}", "Range": "bytes=10-"})
            assert part.status_code == 206 and part.content == manifest[10:], name
            assert client.get(url).status_code == 401
            assert client.get(url, headers={"Authorization": "Bearer " + "u" * 43}).status_code == 401
            assert client.get(f"/api/rollouts/{rollout_id}/files/passwd",
                              headers={"Authorization": f"Bearer {command.token}"}).status_code == 404
        aborted = cluster.http[cluster.other].post(f"/api/rollouts/{rollout_id}/abort", headers=cluster.admin)
        assert aborted.status_code == 200 and aborted.json()["state"] == "aborted", aborted.text
        time.sleep(1.5)  # several of the driver's ticks and resends
        for name in cluster.http:
            status = cluster.get(name, f"/api/rollouts/{rollout_id}")
            assert status["state"] == "aborted" and status["nodes"][0]["state"] == "offered", (name, status)
        with lock:
            assert any(c and c.action == "abort" for c in commands)
    finally:
        listener.stop()
        cluster.stop()


def test_the_drivers_writes_are_fenced_by_its_lease_and_finished_rows_are_kept(postgres):
    """A worker whose rollout lease moved on writes nothing (LeaseLost); an aborted rollout or a skipped node is
    never written over by a step the driver computed before the abort."""
    import psycopg

    from twin.rollout.store import LeaseLost, Rollout, RolloutNode, RolloutStore
    from twin.scaleout.ownership import Leases, ensure_schema
    from twin.store.history import HistoryStore

    HistoryStore(postgres.url).close()
    conn = psycopg.connect(postgres.url, autocommit=True)
    store = RolloutStore(postgres.url)
    try:
        ensure_schema(conn)
        first, second = (Leases(conn=conn, worker=w, slots=1, lease_s=60) for w in ("w0", "w1"))
        epoch = first.claim_node(ROLLOUT)
        assert epoch is not None and second.claim_node(ROLLOUT) is None
        rollout = Rollout("r1", 1, "admin", "v2", "a" * 64, 10, "/nowhere", 0.5, {"rows": 5}, "canary", None, 1)
        nodes = [RolloutNode("r1", "n1", "canary", "pending"), RolloutNode("r1", "n2", "rest", "pending")]
        assert store.save(rollout, nodes, fence=(ROLLOUT, "w0", epoch)) == {"n1", "n2"}
        first.release_node(ROLLOUT)  # w0 stalled: its lease went to w1
        assert second.claim_node(ROLLOUT) == epoch + 1
        offered = RolloutNode("r1", "n1", "canary", "offered", token_hashes=["b" * 64], sent_ms=2, updated_ms=2)
        with pytest.raises(LeaseLost):
            store.save(None, [offered], fence=(ROLLOUT, "w0", epoch))
        assert [n.state for n in store.nodes("r1")] == ["pending", "pending"]  # nothing written
        # an abort (any worker's API, unfenced), then the driver's older step: the abort holds
        rollout.state = "aborted"
        store.save(rollout, [RolloutNode("r1", "n2", "rest", "skipped")])
        rollout.state = "rolling"
        written = store.save(rollout, [offered, RolloutNode("r1", "n2", "rest", "offered")],
                             fence=(ROLLOUT, "w1", epoch + 1))
        assert written == {"n1"}  # n2 was skipped: it is not told
        assert store.rollout("r1").state == "aborted"
        assert [(n.node, n.state) for n in store.nodes("r1")] == [("n1", "offered"), ("n2", "skipped")]
    finally:
        store.close()
        conn.close()
