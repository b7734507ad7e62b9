"""Signed model rollouts: twin (real Mosquitto, real HTTPS) -> edge agents, canary first, with the agents'
own checks (signature, hashes, test vectors), health gate and rollback, and a download that survives SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from deploy.edge.agent import EdgeAgent, EdgeConfig
from deploy.edge.model_slot import ModelSlot
from deploy.edge.rollout import RolloutAgentConfig, RolloutClient
from deploy.edge.sources import SimulatedMill
from deploy.rollout_lab import HttpsServer, ai4i_bundle, make_keys
from tests import polling
from tests.mqtt_certs import make_pki
from tests.services import free_port
from twin.api.app import create_app
from twin.auth import TokenStore, create_token
from twin.rollout.manager import RolloutConfig, RolloutManager
from twin.rollout.protocol import CommandError, HealthGate, RolloutCommand
from twin.service import TwinConfig, TwinService
from twin.sparkplug.payload import Metric, Payload

ROOT = Path(__file__).resolve().parents[3]
MILLS = {"edge-mill-1": "mill-1", "edge-mill-2": "mill-2"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Keys, certificates and signed bundles: v1 and v2 (sound, trained on different generated rows), bad
    (inverted labels: passes its own test vectors, disagrees with v1 on nearly every row)."""
    root = tmp_path_factory.mktemp("lab")
    private, public = make_keys(root / "keys")
    other_private, other_public = make_keys(root / "keys", "other")
    bundles = {name: ai4i_bundle(root / name, sign_key=private, seed=seed, degraded=name == "bad")
               for name, seed in (("v1", 0), ("v2", 1), ("bad", 0))}
    versions = {name: json.loads((b / "card.json").read_text())["model"]["version"] for name, b in bundles.items()}
    return SimpleNamespace(root=root, private=private, public=public, other_private=other_private,
                           pki=make_pki(root / "pki"), bundles=bundles, versions=versions)


def start_twin(broker, tmp_path, lab, port: int, tokens_file: Path) -> SimpleNamespace:
    service = TwinService(config=TwinConfig(broker_port=broker.port, db=str(tmp_path / "twin.db"),
                                            client_id=f"twin-{tmp_path.name}")).start()
    service.wait_connected()
    manager = RolloutManager(config=RolloutConfig(folder=tmp_path / "rollouts", publisher_key=lab.public,
                                                  base_url=f"https://127.0.0.1:{port}", tick_s=0.2, resend_s=1.0),
                             service=service).start_thread()
    server = HttpsServer(create_app(service, tokens=TokenStore.load(tokens_file), rollouts=manager), port,
                         lab.pki.server_cert, lab.pki.server_key).start()
    http = httpx.Client(base_url=server.url, verify=str(lab.pki.ca), timeout=30)

    def stop():
        http.close()
        server.stop()
        manager.stop()
        service.stop()

    return SimpleNamespace(service=service, manager=manager, http=http, stop=stop)


@pytest.fixture
def twin(broker, tmp_path, lab):
    tokens_file = tmp_path / "tokens.json"
    admin, viewer = (create_token(tokens_file, role=r, name=r) for r in ("admin", "viewer"))
    port = free_port()
    running = start_twin(broker, tmp_path, lab, port, tokens_file)
    state = SimpleNamespace(admin={"Authorization": f"Bearer {admin}"}, viewer={"Authorization": f"Bearer {viewer}"},
                            broker=broker, tmp=tmp_path, port=port, tokens_file=tokens_file, **vars(running))

    def restart():
        state.stop()
        vars(state).update(vars(start_twin(broker, tmp_path, lab, port, tokens_file)))

    state.restart = restart
    yield state
    state.stop()


wait_for = partial(polling.wait_for, timeout=60.0, interval=0.1)


class Agent:
    """An edge agent with a model slot (v1 installed by hand) and a rollout client, in a thread."""

    def __init__(self, twin, lab, node: str, *, rate: float = 20.0, bundle: str | None = "v1", **rollout):
        self.slot = ModelSlot(twin.tmp / f"{node}.models", publisher_key=lab.public)
        if bundle is not None and self.slot.active is None:
            self.slot.install_initial(lab.bundles[bundle])
        self.client = RolloutClient(slot=self.slot, config=RolloutAgentConfig(ca=lab.pki.ca, **rollout))
        self.agent = EdgeAgent(config=EdgeConfig(port=twin.broker.port, node=node, device=MILLS[node], rate_hz=rate,
                                                 keepalive_s=2, spool=twin.tmp / f"{node}.spool", node_metrics_s=1.0),
                               source=SimulatedMill(seed=sum(map(ord, node))), model=self.slot, rollout=self.client)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=lambda: setattr(self, "stats", self.agent.run(self.stop_event)))
        self.thread.start()

    def stop(self) -> dict:
        self.stop_event.set()
        self.thread.join(timeout=30)
        return self.stats


def start_rollout(twin, bundle: Path, nodes, *, canary=0.5, rows=20, **gate) -> dict:
    response = twin.http.post("/api/rollouts", headers=twin.admin, json={
        "bundle": str(bundle), "nodes": list(nodes), "canary": canary, "gate": {"rows": rows, **gate}})
    assert response.status_code == 201, response.text
    return response.json()


def rollout_status(twin, rollout_id: str) -> dict:
    response = twin.http.get(f"/api/rollouts/{rollout_id}", headers=twin.viewer)
    assert response.status_code == 200, response.text
    return response.json()


def finished(twin, rollout_id: str):
    status = rollout_status(twin, rollout_id)
    return status if status["state"] in ("completed", "partial", "failed", "aborted") else None


def test_rollout_command_round_trips_and_malformed_ones_are_refused():
    command = RolloutCommand("r-1", "install", "https://twin:8443/api/rollouts/r-1/files/", "t" * 43, "a" * 64,
                             "2fb048c120ff778f", 1_000_000, HealthGate(rows=10, max_drift=0.1))
    assert RolloutCommand.from_payload(command.payload(0)) == command
    assert RolloutCommand.from_payload(Payload(0, metrics=[Metric("Node Control/Rebirth", True, "Boolean")])) is None
    good = {m.name: m for m in command.payload(0).metrics}
    for name, value in [("Model Rollout/URL", "file:///etc/passwd"), ("Model Rollout/SHA256", "../" * 22),
                        ("Model Rollout/Bytes", 10**12), ("Model Rollout/Gate Rows", -1),
                        ("Node Control/Model Rollout", "../../x"), ("Model Rollout/Version", "v" * 65),
                        ("Model Rollout/Max Drift", "0.1"), ("Model Rollout/Action", "format")]:
        metrics = [Metric(m.name, value if m.name == name else m.value, m.type) for m in good.values()]
        with pytest.raises(CommandError):
            RolloutCommand.from_payload(Payload(0, metrics=metrics))


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_rollout_store_keeps_rollouts_and_nodes_across_connections(dialect, database_url):
    from twin.rollout.store import Rollout, RolloutNode, RolloutStore

    url = database_url(dialect, f"r{os.getpid()}_{time.monotonic_ns() % 10**8}")
    store = RolloutStore(url)
    rollout = Rollout("r1", 1, "admin", "v2", "a" * 64, 10, "/x", 0.1, {"rows": 5}, "canary", None, 1)
    nodes = [RolloutNode("r1", "n1", "canary", "offered", token_hashes=["h1"], offered_ms=2, sent_ms=2, updated_ms=2),
             RolloutNode("r1", "n2", "rest", "pending", updated_ms=1)]
    store.save(rollout, nodes)
    rollout.state, nodes[0].state, nodes[0].token_hashes = "rolling", "healthy", ["h1", "h2"]
    store.save(rollout, nodes[:1])
    store.close()
    again = RolloutStore(url)  # a restarted twin
    assert again.rollout("r1").state == "rolling" and again.rollout("r1").gate == {"rows": 5}
    assert [(n.node, n.state, n.token_hashes) for n in again.nodes("r1")] == [("n1", "healthy", ["h1", "h2"]),
                                                                            ("n2", "pending", [])]
    assert [r.id for r in again.rollouts(active_only=True)] == ["r1"]
    assert again.rollout("nope") is None
    again.close()


@pytest.mark.slow
def test_canary_then_the_rest_with_no_telemetry_lost(twin, lab):
    agents = {node: Agent(twin, lab, node) for node in MILLS}
    wait_for(lambda: all(m["model_version"] == lab.versions["v1"]
                         for m in twin.http.get("/api/edge-models", headers=twin.viewer).json()
                         if m["node"] in MILLS), what="both nodes on v1")
    refused = twin.http.post("/api/rollouts", headers=twin.viewer,
                             json={"bundle": str(lab.bundles["v2"]), "nodes": list(MILLS)})
    assert refused.status_code == 403
    started = start_rollout(twin, lab.bundles["v2"], MILLS)
    assert started["state"] == "canary" and started["version"] == lab.versions["v2"]
    assert sorted(n["wave"] for n in started["nodes"]) == ["canary", "rest"]
    status = wait_for(lambda: finished(twin, started["id"]), what="the rollout to finish")
    assert status["state"] == "completed", status
    assert status["counts"] == {"healthy": 2}
    models = {m["node"]: m for m in twin.http.get("/api/edge-models", headers=twin.viewer).json()}
    for node in MILLS:
        assert models[node]["model_version"] == lab.versions["v2"]
        assert models[node]["previous_version"] == lab.versions["v1"]
    time.sleep(1.0)  # rows scored by v2 after the gate
    stats = {node: agent.stop() for node, agent in agents.items()}
    for node, device in MILLS.items():
        assert stats[node]["spool_depth"] == 0
        # acknowledged by the broker is not yet committed by the twin: wait for the last rows to arrive
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            twin.service.store.flush()
            if len(twin.service.store.seqs(device)) >= stats[node]["produced"]:
                break
            time.sleep(0.2)
        seqs = twin.service.store.seqs(device)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(seqs) == stats[node]["produced"]
        rows = twin.service.store.history(device, limit=None)
        versions = [r["values"].get("edge_model") for r in rows]
        assert versions[0] == lab.versions["v1"] and versions[-1] == lab.versions["v2"]
        swap = versions.index(lab.versions["v2"])  # one switch, no row without a model in between
        assert set(versions[:swap]) == {lab.versions["v1"]} and set(versions[swap:]) == {lab.versions["v2"]}
        assert all(0.0 <= r["values"]["edge_failure"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_degraded_canary_rolls_back_by_itself_and_stops_the_rollout(twin, lab):
    agents = {node: Agent(twin, lab, node) for node in MILLS}
    started = start_rollout(twin, lab.bundles["bad"], MILLS, rows=30, max_drift=0.2)
    status = wait_for(lambda: finished(twin, started["id"]), what="the rollout to stop")
    assert status["state"] == "failed", status
    nodes = {n["node"]: n for n in status["nodes"]}
    canary = next(n for n in nodes.values() if n["wave"] == "canary")
    rest = next(n for n in nodes.values() if n["wave"] == "rest")
    assert canary["state"] == "rolled_back" and "prediction drift" in canary["reason"]
    assert rest["state"] == "skipped" and rest["offered_ms"] is None  # never told
    slot = agents[canary["node"]].slot
    assert slot.version == lab.versions["v1"] and slot.stats["rollbacks"] == 1
    assert slot.rolled_back_at - slot.swapped_at < 30 / 20 + 5  # the gate's 30 rows at 20 Hz, plus slack
    assert not (slot.root / "models" / lab.versions["bad"]).exists()
    models = {m["node"]: m for m in twin.http.get("/api/edge-models", headers=twin.viewer).json()}
    assert models[canary["node"]]["model_version"] == lab.versions["v1"]
    assert models[canary["node"]]["rollout_state"] == "rolled_back"
    assert models[rest["node"]]["model_version"] == lab.versions["v1"]
    for agent in agents.values():
        agent.stop()


@pytest.mark.slow
def test_a_model_over_the_gates_scoring_time_is_rolled_back(twin, lab):
    agent = Agent(twin, lab, "edge-mill-2")
    started = start_rollout(twin, lab.bundles["v2"], ["edge-mill-2"], canary=1.0, rows=10, max_latency_ms=0.0)
    status = wait_for(lambda: finished(twin, started["id"]), what="the rollout to stop")
    node = status["nodes"][0]
    assert status["state"] == "failed" and node["state"] == "rolled_back" and "scoring time" in node["reason"]
    assert agent.slot.version == lab.versions["v1"]
    agent.stop()


def _resign(bundle: Path, lab, change) -> Path:
    """A copy of `bundle` changed by `change(folder)`, then re-manifested and re-signed with the publisher's key."""
    import shutil

    from core.bundle_signing import sign, write_manifest

    folder = lab.root / f"resigned-{time.monotonic_ns()}"
    shutil.copytree(bundle, folder)
    change(folder)
    (folder / "model.sig").unlink()
    write_manifest(folder)
    sign(folder, lab.private)
    return folder


@pytest.mark.slow
def test_tampered_bundles_are_refused_by_the_twin_and_by_the_agent(twin, lab):
    import shutil

    # the twin checks what it is asked to offer
    flipped = lab.root / "flipped"
    shutil.copytree(lab.bundles["v2"], flipped, dirs_exist_ok=True)
    data = bytearray((flipped / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "model.onnx").write_bytes(bytes(data))
    from core.bundle_signing import sign

    foreign = lab.root / "foreign"
    shutil.copytree(lab.bundles["v2"], foreign, dirs_exist_ok=True)
    (foreign / "model.sig").unlink()
    sign(foreign, lab.other_private)
    for bundle in (flipped, foreign, lab.root / "no-such-folder"):
        response = twin.http.post("/api/rollouts", headers=twin.admin, json={"bundle": str(bundle),
                                                                             "nodes": ["edge-mill-1"]})
        assert response.status_code == 422 and "refused" in response.json()["detail"], response.text
    assert twin.http.get("/api/rollouts", headers=twin.viewer).json() == []

    # the agent checks what it gets: the twin's copy is changed after the twin verified it (a compromised server)
    started = start_rollout(twin, lab.bundles["v2"], ["edge-mill-1"], canary=1.0)
    served = Path(twin.manager.store.rollout(started["id"]).folder) / "model.onnx"
    served.write_bytes(bytes(data))
    agent = Agent(twin, lab, "edge-mill-1")
    status = wait_for(lambda: finished(twin, started["id"]), what="the rollout to stop")
    assert status["state"] == "failed"
    assert status["nodes"][0]["state"] == "refused" and "SHA-256" in status["nodes"][0]["reason"]
    assert agent.slot.version == lab.versions["v1"]
    assert not list((agent.slot.root / "staging").iterdir())  # nothing half-fetched is kept
    agent.stop()


@pytest.mark.slow
def test_a_model_failing_its_test_vectors_is_refused_by_the_agent(twin, lab):
    def break_vectors(folder: Path) -> None:
        vectors = json.loads((folder / "test_vectors.json").read_text())
        vectors["expected"]["failure"] = [1.0 - p for p in vectors["expected"]["failure"]]
        (folder / "test_vectors.json").write_text(json.dumps(vectors))

    wrong = _resign(lab.bundles["v2"], lab, break_vectors)  # signed by the publisher: the twin offers it
    agent = Agent(twin, lab, "edge-mill-1")
    started = start_rollout(twin, wrong, ["edge-mill-1"], canary=1.0)
    status = wait_for(lambda: finished(twin, started["id"]), what="the rollout to stop")
    node = status["nodes"][0]
    assert status["state"] == "failed" and node["state"] == "refused"
    assert "test vectors" in node["reason"], node
    assert agent.slot.version == lab.versions["v1"]
    agent.stop()


def test_bundle_files_need_a_token_and_name_only_listed_files(twin, lab):
    started = start_rollout(twin, lab.bundles["v2"], ["edge-mill-2"], canary=1.0)  # no agent: stays offered
    base = f"/api/rollouts/{started['id']}/files/"
    assert twin.http.get(base + "model.onnx").status_code == 401
    assert twin.http.get(base + "model.onnx", headers={"Authorization": "Bearer nope"}).status_code == 401
    for name in ("..%2F..%2Ftwin.db", "%2Fetc%2Fpasswd", "command.json", "..%5Cmanifest.json", "a" * 65):
        assert twin.http.get(base + name, headers=twin.viewer).status_code in (404, 422), name
    size = (lab.bundles["v2"] / "model.onnx").stat().st_size
    ranged = twin.http.get(base + "model.onnx", headers=twin.viewer | {"Range": "bytes=1000-"})
    assert ranged.status_code == 206 and len(ranged.content) == size - 1000
    assert ranged.content == (lab.bundles["v2"] / "model.onnx").read_bytes()[1000:]
    aborted = twin.http.post(f"/api/rollouts/{started['id']}/abort", headers=twin.admin).json()
    assert aborted["state"] == "aborted"
    assert twin.http.get(base + "model.onnx", headers=twin.viewer).status_code == 404


@pytest.mark.slow
def test_agent_killed_mid_download_resumes(twin, lab):
    node = "edge-mill-1"
    models, spool = twin.tmp / "cli.models", twin.tmp / "cli.spool"

    def run_agent(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "edge", "run", "--source", "sim-mill", "--node", node, "--device",
             MILLS[node], "--port", str(twin.broker.port), "--spool", str(spool), "--rate", "20",
             "--bundle-key", str(lab.public), "--bundle", str(lab.bundles["v1"]), "--models", str(models),
             "--rollout-ca", str(lab.pki.ca), "--json", *extra],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    first = run_agent("--max-download-bps", "100000")
    started = None
    try:
        wait_for(lambda: twin.service.node_metrics(node).get("Model/Version") == lab.versions["v1"],
                 what="the agent's birth with v1")
        started = start_rollout(twin, lab.bundles["v2"], [node], canary=1.0)
        part = models / "staging" / started["id"] / "bundle" / "model.onnx.part"
        wait_for(lambda: part.is_file() and part.stat().st_size > 200_000, what="a partial download")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    fetched_before = part.stat().st_size
    total = (lab.bundles["v2"] / "model.onnx").stat().st_size
    assert 0 < fetched_before < total
    second = run_agent("--duration", "25")
    try:
        status = wait_for(lambda: finished(twin, started["id"]), what="the rollout to finish after the restart")
    finally:
        second.send_signal(signal.SIGTERM)
        out, err = second.communicate(timeout=30)
    assert status["state"] == "completed", (status, err[-2000:])
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["model_version"] == lab.versions["v2"] and stats["resumed"] == 1
    assert stats["bytes_fetched"] < total  # only what the first run had not fetched (plus the small files)


@pytest.mark.slow
def test_a_rollout_carries_on_after_a_twin_restart_and_the_cli_reads_it(twin, lab):
    token_file = twin.tmp / "admin.token"
    token_file.write_text(twin.admin["Authorization"].split()[1])

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "deploy.cli", "twin", "rollout", *args,
                               "--url", f"https://127.0.0.1:{twin.port}", "--ca", str(lab.pki.ca),
                               "--token-file", str(token_file), "--json"],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                              timeout=120)

    started = cli("start", "--bundle", str(lab.bundles["v2"]), "--nodes", "edge-mill-1", "--canary", "1",
                  "--gate-rows", "10")
    assert started.returncode == 0, started.stderr
    rollout_id = json.loads(started.stdout)["id"]
    assert cli("start", "--bundle", str(lab.bundles["v2"]), "--nodes", "nobody").returncode == 2
    # the twin stops before the node ever came online; a new twin on the same database takes over
    twin.restart()
    agent = Agent(twin, lab, "edge-mill-1")
    status = wait_for(lambda: finished(twin, rollout_id), what="the rollout to finish after the restart")
    assert status["state"] == "completed"
    shown = cli("status", rollout_id)
    assert shown.returncode == 0 and json.loads(shown.stdout)["counts"] == {"healthy": 1}
    assert agent.slot.version == lab.versions["v2"]
    agent.stop()


@pytest.mark.slow
@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
def test_rollout_routes_never_500_and_answer_as_their_schema_says(lab, tmp_path, auth):
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    from tests.twin.api.test_api_fuzz import fuzz

    service = TwinService(config=TwinConfig(broker_port=free_port(), db=str(tmp_path / "twin.db"))).start()
    manager = RolloutManager(config=RolloutConfig(folder=tmp_path / "rollouts", publisher_key=lab.public,
                                                  base_url="https://127.0.0.1:1"), service=service)
    try:
        manager.start(bundle=lab.bundles["v2"], nodes=["edge-mill-1"], canary_share=1.0, gate=HealthGate(),
                      created_by="test")  # one real rollout to list
        tokens, headers = None, None
        if auth:
            token = create_token(tmp_path / "tokens.json", role="admin", name="fuzzer")
            tokens, headers = TokenStore.load(tmp_path / "tokens.json"), {"Authorization": f"Bearer {token}"}
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(service, tokens=tokens, rollouts=manager))
        failures, operations = {}, 0
        for result in schema.get_all_operations():
            operation = result.ok()
            if not operation.path.startswith(("/api/rollouts", "/api/edge-models")):
                continue
            operations += 1
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    fuzz(operation, mode, headers, [])
                except Unsatisfiable:
                    assert mode == GenerationMode.NEGATIVE, operation.label
                except (Exception, BaseExceptionGroup) as error:
                    failures[f"{operation.method.upper()} {operation.path} ({mode.value})"] = str(error)[:2000]
        assert operations == 6
        assert not failures, "\n\n".join(f"{name}:\n{why}" for name, why in failures.items())
    finally:
        manager.stop()
        service.stop()
