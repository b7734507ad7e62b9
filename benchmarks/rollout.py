"""Signed model rollout to N simulated edge nodes with a canary share: time to complete, telemetry gaps,
rollback time after a degraded model.

Everything real but the machines: Debian's Mosquitto on loopback, the twin (state, SQLite history,
rollout manager, its API over HTTPS with a CA made for the run by tests/mqtt_certs.py), and N edge
agents in this process (each its own MQTT connection, spool, model slot with onnxruntime sessions,
rollout client), publishing AI4I-type rows at `--rate` Hz each. Models: AI4I LightGBM bundles
trained on GENERATED rows and signed with a key made for the run; v1 is installed on every node
first, then

1. v2 (a sound model trained on other rows) is rolled out with the canary share: seconds from the
   API call to `completed`, and from the call to the end of the canary wave;
2. a degraded bundle (labels inverted: it passes its own test vectors) is rolled out the same way:
   the canary's health gate must roll it back by itself and stop the rollout; reported: seconds from
   the canary's swap to its rollback (the gate's window is `--gate-rows / --rate` s) and from the API
   call to `failed`, and how many nodes outside the canary were ever told.

Telemetry gaps: after the agents stop and their spools drain, every device's history serials must
run without a hole and number what the agent produced (target 0 gaps, 0 lost), and every row must
name the model that scored it.

    nice python -m benchmarks.rollout --nodes 50 --canary 0.1 --json
    nice python -m benchmarks.rollout --nodes 20 --canary 0.1 --workers 0,2   # single twin, then 2 workers

`--workers N` runs the twin as N scale-out workers (`python -m twin.scaleout.worker` processes, history
and rollouts in a throwaway PostgreSQL cluster, each serving the API over HTTPS; the NCMDs name worker
0's port) instead of the single twin (0, on SQLite); several values run one after the other on the same
bundles, each with its own broker, agents and database, for a side-by-side comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--canary", type=float, default=0.1)
    parser.add_argument("--rate", type=float, default=2.0, help="rows per second per node")
    parser.add_argument("--gate-rows", type=int, default=20, help="rows each node's health gate watches")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a rollout after this long")
    parser.add_argument("--workers", default="0", help="comma-separated: 0 the single twin, N scale-out workers")
    common.add_output_arguments(parser, Path("benchmarks/results/rollout.json"))
    args = parser.parse_args()
    if not 1 <= args.nodes <= 500 or not 0 < args.canary <= 1 or not 0 < args.rate <= 50:
        parser.error("--nodes 1..500, --canary (0, 1], --rate (0, 50]")
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        workers = []
    if not workers or not all(0 <= w <= 8 for w in workers):
        parser.error("--workers: comma-separated counts in 0..8 (0: the single twin)")
    with tempfile.TemporaryDirectory(prefix="moeworks-rollout-") as folder:
        runs = [run(Path(folder), args, workers=w) for w in workers]
    results = runs[0] if len(runs) == 1 else {"benchmark": "rollout", "runs": runs}
    common.write_results(results, args.out, as_json=args.json)


_LAB: dict = {}


def _lab(root: Path):
    """Keys, certificates and the three signed bundles: made once per invocation, shared by every --workers run."""
    from deploy.rollout_lab import ai4i_bundle, make_keys
    from tests.mqtt_certs import make_pki

    if not _LAB:
        private, public = make_keys(root / "keys")
        _log("training and signing the bundles (v1, v2, degraded)")
        _LAB.update(public=public, pki=make_pki(root / "pki"), bundles={
            name: ai4i_bundle(root / name, sign_key=private, seed=seed, degraded=name == "bad")
            for name, seed in (("v1", 0), ("v2", 1), ("bad", 0))})
    return _LAB["public"], _LAB["pki"], _LAB["bundles"]


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _single_twin(root: Path, plant, broker, public, pki):
    """The single twin in this process (SQLite history), its API over HTTPS: (API URL, history store, stop)."""
    from deploy.rollout_lab import HttpsServer
    from tests.services import free_port
    from twin.api.app import create_app
    from twin.rollout.manager import RolloutConfig, RolloutManager
    from twin.service import TwinConfig, TwinService

    service = TwinService(config=TwinConfig(broker_port=broker.port, db=str(root / "twin.db"),
                                            client_id="bench-rollout-twin"), plant=plant).start()
    service.wait_connected()
    port = free_port()
    manager = RolloutManager(config=RolloutConfig(folder=root / "rollouts", publisher_key=public,
                                                  base_url=f"https://127.0.0.1:{port}", tick_s=0.2),
                             service=service).start_thread()
    server = HttpsServer(create_app(service, rollouts=manager), port, pki.server_cert, pki.server_key).start()

    def stop():
        server.stop()
        manager.stop()
        service.stop()

    return server.url, service.store, service.store.flush, stop


def _worker_twin(root: Path, workers: int, broker, public, pki, nodes: int):
    """`workers` scale-out worker processes on a throwaway PostgreSQL, each serving the API over HTTPS and running
    a rollout manager (one drives): (worker 0's API URL, a history store on the database, stop)."""
    from tests.services import PostgresCluster, free_port, wait_port
    from twin.store.history import HistoryStore

    cluster = PostgresCluster().start()
    ports = [free_port() for _ in range(workers)]
    base = f"https://127.0.0.1:{ports[0]}"
    config = {"broker_port": broker.port, "db": cluster.url, "client_id": "bench-rollout-twin", "work_orders_csv": None,
              "generated_plant": {"machines": nodes, "nodes": nodes, "group": "bench"},
              "https_cert": str(pki.server_cert), "https_key": str(pki.server_key),
              "rollout": {"folder": str(root / "rollouts"), "publisher_key": str(public), "base_url": base,
                          "tick_s": 0.2}}
    procs = []
    try:  # one process each, with its own HTTP port
        for k in range(workers):
            path = root / f"worker-{k}.json"
            path.write_text(json.dumps({**config, "http_port": ports[k], "scale": {
                "worker": f"w{k}", "slots": workers, "home_slot": k, "lease_s": 3.0}}))
            procs.append(subprocess.Popen([sys.executable, "-m", "twin.scaleout.worker", str(path)],
                                          env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                          stderr=(root / f"worker-{k}.log").open("ab"), text=True))
        for k, proc in enumerate(procs):
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker {k} did not start: {(root / f'worker-{k}.log').read_text()[-2000:]}")
    except BaseException:
        _stop_all(procs)
        cluster.stop()
        raise
    for port in ports:
        wait_port(port, timeout=30)
    store = HistoryStore(cluster.url)

    def stop():
        store.close()
        _stop_all(procs)
        cluster.stop()

    return base, store, lambda: None, stop


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(root: Path, args, *, workers: int = 0) -> dict:
    import httpx

    from deploy.edge.agent import EdgeAgent, EdgeConfig
    from deploy.edge.model_slot import ModelSlot
    from deploy.edge.rollout import RolloutAgentConfig, RolloutClient
    from deploy.edge.sources import SimulatedMill
    from tests.services import Mosquitto
    from twin.domain.plant import Plant

    public, pki, bundles = _lab(root)
    root = root / f"workers-{workers}"
    root.mkdir()
    plant = Plant.generated(machines=args.nodes, nodes=args.nodes, group="bench")
    broker = Mosquitto(workdir=root / "mosquitto").start()
    if workers:
        url, store, flush, stop_twin = _worker_twin(root, workers, broker, public, pki, args.nodes)
    else:
        url, store, flush, stop_twin = _single_twin(root, plant, broker, public, pki)
    http = httpx.Client(base_url=url, verify=str(pki.ca), timeout=60)

    _log(f"starting {args.nodes} agents on v1 ({workers or 'single'} twin{' workers' if workers else ''})")
    # v1 verified once, then copied: each slot verifies it again when it loads it (as a restarted node would)
    first = ModelSlot(root / "agents" / "seed.models", publisher_key=public)
    v1 = first.install_initial(bundles["v1"])
    agents, stop = [], threading.Event()
    for node, devices in sorted(plant.nodes.items()):
        slot_root = root / "agents" / f"{node}.models"
        shutil.copytree(first.root, slot_root)
        slot = ModelSlot(slot_root, publisher_key=public)
        client = RolloutClient(slot=slot, config=RolloutAgentConfig(ca=pki.ca))
        agent = EdgeAgent(config=EdgeConfig(port=broker.port, group="bench", node=node, device=devices[0],
                                            rate_hz=args.rate, keepalive_s=10, spool=root / "agents" / f"{node}.spool",
                                            node_metrics_s=5.0),
                          source=SimulatedMill(seed=len(agents)), model=slot, rollout=client)
        thread = threading.Thread(target=lambda a=agent: a.stats.update(a.run(stop)), daemon=True)
        agents.append((node, devices[0], slot, agent, thread))
        thread.start()
    machine = common.machine()

    def models() -> dict[str, str]:
        return {m["node"]: m["model_version"] for m in http.get("/api/edge-models").json()}

    _wait(lambda: all(v == v1 for v in models().values()), 120, "every node born on v1")
    phases = {}
    for name in ("v2", "bad"):
        _log(f"rollout of {name}")
        started = time.monotonic()
        response = http.post("/api/rollouts", json={"bundle": str(bundles[name]), "nodes": sorted(plant.nodes),
                                                    "canary": args.canary, "gate": {"rows": args.gate_rows}})
        response.raise_for_status()
        rollout_id, canary_done = response.json()["id"], None
        while time.monotonic() - started < args.timeout:
            status = http.get(f"/api/rollouts/{rollout_id}").json()
            if canary_done is None and status["state"] != "canary":
                canary_done = time.monotonic() - started
            if status["state"] in ("completed", "partial", "failed", "aborted"):
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        canary = [n for n in status["nodes"] if n["wave"] == "canary"]
        phase = {"state": status["state"], "seconds": round(elapsed, 2),
                 "canary_wave_seconds": round(canary_done, 2) if canary_done else None,
                 "canary_nodes": len(canary), "counts": status["counts"],
                 "nodes_told_outside_canary": sum(n["offered_ms"] is not None for n in status["nodes"]
                                                  if n["wave"] == "rest")}
        if name == "bad":
            slots = {node: slot for node, _, slot, _, _ in agents}
            rollbacks = [slots[n["node"]].rolled_back_at - slots[n["node"]].swapped_at for n in canary
                         if slots[n["node"]].rolled_back_at is not None]
            phase.update(rolled_back=len(rollbacks), rollback_after_swap_s_max=round(max(rollbacks), 2)
                         if rollbacks else None, gate_window_s=args.gate_rows / args.rate)
        phases[name] = phase
        _log(f"{name}: {phase}")
    final = models()
    stop.set()
    for *_, thread in agents:
        thread.join(timeout=60)
    flush()
    produced = sum(agent.stats["produced"] for *_, agent, _ in agents)
    deadline = time.monotonic() + 30  # workers: the last rows pass through the inbox (hold_ms) first
    while workers and time.monotonic() < deadline and sum(len(store.seqs(d)) for _, d, *_ in agents) < produced:
        time.sleep(0.5)
    gaps = lost = unlabelled = rows_total = 0
    for _, device, _, agent, _ in agents:
        seqs = store.seqs(device)
        gaps += sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1)
        lost += agent.stats["produced"] - len(seqs)
        rows = store.history(device, limit=None)
        rows_total += len(rows)
        unlabelled += sum(1 for r in rows if r["values"].get("edge_model") in (None, "none"))
    http.close()
    stop_twin()
    broker.stop()
    return {"benchmark": "rollout", "twin": f"{workers} workers (PostgreSQL)" if workers else "single (SQLite)",
            "machine": machine, "nodes": args.nodes, "canary_share": args.canary,
            "rate_hz_per_node": args.rate, "gate_rows": args.gate_rows, "bundle_bytes": sum(
                p.stat().st_size for p in bundles["v2"].iterdir()), "rollouts": phases,
            "on_v2_at_end": sum(v == _version(bundles["v2"]) for v in final.values()),
            "telemetry": {"rows": rows_total, "serial_gaps": gaps, "lost": lost, "rows_without_model": unlabelled}}


def _version(bundle: Path) -> str:
    return json.loads((bundle / "card.json").read_text())["model"]["version"]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise SystemExit(f"error: timed out waiting for {what}")


if __name__ == "__main__":
    main()
