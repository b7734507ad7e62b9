"""Digital twin ingestion through Mosquitto (or the built-in broker) on loopback: rate, loss, latency, capacity.

Publisher processes simulate many AI4I-type devices (NBIRTH/DBIRTH, then DDATA at QoS 1 with
seq numbers) at a target total rate; the twin (this process) ingests into state, alarms, health
and SQLite history. For each target rate: the rate of messages committed to history during the
measured window, end-to-end latency (edge timestamp -> history row committed) p50/p99, and loss
(messages the broker acknowledged to the publishers minus rows in history, after draining); also
publish -> state updated p50/p99.
Capacity: memory the twin's live state takes per device.

`--attack 0.01` mixes forged messages into the feed, one per 100 legitimate ones, in turn: malformed
JSON, an oversized payload, an out-of-range timestamp (int64 overflow), a spoofed seq (10^15) and a
spoofed NBIRTH bdSeq (10^15); each must become a dead letter and cost no legitimate row.
`--kill-cycles N` runs the twin as its own process (`python -m twin.service`) and SIGKILLs and
restarts it N times during the measured window; the rates and latencies then come from the history
rows (received_ms - edge timestamp: publish to state), and lost/duplicated rows are counted against
exactly what the publishers sent and the broker acknowledged.

`--payload json,protobuf` runs each rate once per payload encoding, side by side: our JSON, and
Sparkplug B protobuf as the edge agent sends it (births declaring aliases, DDATA by alias alone,
encoded by twin.sparkplug per message, so the publishers pay what an edge pays).

    python -m benchmarks.twin --json
    python -m benchmarks.twin --rates 2000 --attack 0.01 --kill-cycles 5
    python -m benchmarks.twin --rates 2000,5000 --seconds 10 --payload json,protobuf
    python -m benchmarks.twin --workers 0,1,2 --rates 2000 --kill-worker   # the scaled-out twin

`--workers 0,1,2` runs the scaled-out twin (twin/scaleout.py: worker processes sharing the subscription
through MQTT shared subscriptions, state and history in PostgreSQL) with each worker count in turn in
one run (0: the single twin process on the same PostgreSQL, the baseline): the rate of rows applied
during the window, CPU per message of the workers, PostgreSQL and Mosquitto, and messages per
CPU-second of the workers (what one worker with a core of its own would do, to read scaling off on
a larger machine). `--kill-worker` adds a run in which one worker is SIGKILLed halfway and not
restarted; lost and duplicated rows and alarms raised twice are counted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks import common
from benchmarks.fixtures import REPO, add_mqtt_load_arguments

DDATA_TEMPLATE = ('{"timestamp":%d,"seq":%d,"serial":%d,"metrics":[{"name":"product_type","value":"L"},'
                  '{"name":"air_temperature","value":%.1f},{"name":"process_temperature","value":%.1f},'
                  '{"name":"rotational_speed","value":%d},{"name":"torque","value":%.1f},'
                  '{"name":"tool_wear","value":%d.0}]}')
DDATA_METRICS = ("product_type", "air_temperature", "process_temperature", "rotational_speed", "torque", "tool_wear")
PAYLOADS = ("json", "protobuf")


NOISE_BLOCK = 8192
ATTACKS = ("malformed", "oversized", "out_of_range", "spoofed_seq", "spoofed_bdseq")


def attack_message(kind: str, group: str, node: str, device: str, stamp: int) -> tuple[str, bytes]:
    from twin.sparkplug.payload import MAX_PAYLOAD_BYTES

    data = f"spBv1.0/{group}/DDATA/{node}/{device}"
    if kind == "malformed":
        return data, b'{"timestamp":%d,"seq":1,"metrics":[{"name":' % stamp
    if kind == "oversized":
        return data, b'{"timestamp":%d,"seq":1,"pad":"%s"}' % (stamp, b"x" * MAX_PAYLOAD_BYTES)
    if kind == "out_of_range":
        return data, b'{"timestamp":9223372036854775813,"seq":5,"metrics":[]}'
    if kind == "spoofed_seq":
        return data, b'{"timestamp":%d,"seq":1000000000000000,"metrics":[]}' % stamp
    return f"spBv1.0/{group}/NBIRTH/{node}", b'{"timestamp":%d,"seq":0,"bdSeq":1000000000000000}' % stamp


def _readings(rng: np.random.Generator, n: int) -> list[list]:
    """Air and process temperature (K), speed (rpm, integer), torque (Nm) for n messages: lists of n."""
    return [(300 + rng.normal(0, 2, n)).tolist(), (310 + rng.normal(0, 1, n)).tolist(),
            np.rint(1500 + rng.normal(0, 50, n)).astype(np.int64).tolist(), (40 + rng.normal(0, 5, n)).tolist()]


def publish_load(port: int, group: str, nodes: list[str], devices: dict[str, list[str]], rate: float,
                 seconds: float, seed: int, out: mp.Queue, ready: mp.Queue, go, attack: float = 0.0,
                 payload: str = "json") -> None:
    """One publisher process: births for its nodes and devices, then DDATA at `rate` msg/s for `seconds`.

    Each DDATA is a real Sparkplug-style message (its node's next seq, one counter over the node's births
    and data as Sparkplug has it; its device's next serial; the edge clock in ms; six AI4I metrics) at QoS
    1, counted as acknowledged on the broker's PUBACK. To leave the shared CPUs to the twin, it is made
    cheaply: the random readings for a whole tick come from numpy at once, the JSON from a template, and
    a tick's messages leave in one write (twin.mqtt_burst, as the twin receives).
    """
    from twin.mqtt.burst_client import BurstClient, BurstClientConfig
    from twin.sparkplug.payload import Metric, Payload
    from twin.sparkplug.protobuf import assign_aliases, encode

    acked = [0]
    client = BurstClient(config=BurstClientConfig(port=port, client_id=f"bench-pub-{seed}", keepalive_s=30),
                         on_acked=lambda mids: acked.__setitem__(0, acked[0] + len(mids))).start()
    client.wait_connected(30)
    rng = np.random.default_rng(seed)
    births = []
    aliases = {d: assign_aliases(d, DDATA_METRICS) for node in nodes for d in devices[node]}
    node_seq = {node: len(devices[node]) for node in nodes}  # the next seq after the NBIRTH (0) and DBIRTHs
    for node in nodes:
        stamp = int(time.time() * 1000)
        if payload == "protobuf":
            births.append((f"spBv1.0/{group}/NBIRTH/{node}", encode(Payload(stamp, 0, 0))))
            births += [(f"spBv1.0/{group}/DBIRTH/{node}/{d}", encode(Payload(stamp, i % 256, None, [
                Metric(name, None, "String" if name == "product_type" else "Double") for name in DDATA_METRICS],
                serial=0), aliases=aliases[d])) for i, d in enumerate(devices[node], start=1)]
            continue
        births.append((f"spBv1.0/{group}/NBIRTH/{node}", json.dumps({"timestamp": stamp, "seq": 0,
                                                                   "bdSeq": 0}).encode()))
        births += [(f"spBv1.0/{group}/DBIRTH/{node}/{d}", json.dumps({"timestamp": stamp, "seq": i % 256,
                                                                       "serial": 0}).encode())
                   for i, d in enumerate(devices[node], start=1)]
    client.publish_many(births, qos=1)
    targets = [f"spBv1.0/{group}/DDATA/{node}/{d}" for node in nodes for d in devices[node]]
    deadline = time.monotonic() + 60
    while acked[0] < len(births) and time.monotonic() < deadline:
        time.sleep(0.01)
    ready.put(seed)
    go.wait(120)  # all publishers start together, so the measured window sees the whole offered rate
    published, per_round, noise = 0, len(targets), None
    attacks_sent, attack_due = 0, 0.0
    owners = [(node, d) for node in nodes for d in devices[node]]
    start, cpu0 = time.monotonic(), time.process_time()
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(rate * elapsed) - published
        if due > 0 and client.inflight < 50_000:  # packet ids are 16 bits: never run out of them
            stamp = int(time.time() * 1000)  # the edge clock when this tick's messages leave
            messages = []
            for k in range(published, published + due):
                j = k % NOISE_BLOCK
                if j == 0 or noise is None:  # fresh readings for the next block of messages, from numpy at once
                    noise = _readings(rng, NOISE_BLOCK)
                serial = k // per_round  # message k goes to device k % per_round: its serial is the round number
                target = targets[k % per_round]
                node = owners[k % per_round][0]
                seq, node_seq[node] = node_seq[node], (node_seq[node] + 1) % 256
                if payload == "protobuf":  # as an edge agent encodes its DDATA: the real codec, aliases only
                    raw = encode(Payload(stamp, seq, None, [
                        Metric("product_type", "L", "String"), Metric("air_temperature", noise[0][j], "Double"),
                        Metric("process_temperature", noise[1][j], "Double"),
                        Metric("rotational_speed", noise[2][j], "Double"), Metric("torque", noise[3][j], "Double"),
                        Metric("tool_wear", float(serial % 200), "Double")], serial=serial),
                        aliases=aliases[target.rsplit("/", 1)[1]], names=False)
                else:
                    raw = (DDATA_TEMPLATE % (stamp, seq, serial, noise[0][j], noise[1][j], noise[2][j],
                                             noise[3][j], serial % 200)).encode()
                messages.append((target, raw))
            attack_due += due * attack
            while attack_due >= 1.0:  # forged messages in between the real ones
                attack_due -= 1.0
                node, device = owners[attacks_sent % len(owners)]
                messages.insert(int(rng.integers(0, len(messages) + 1)), attack_message(
                    ATTACKS[attacks_sent % len(ATTACKS)], group, node, device, stamp))
                attacks_sent += 1
            client.publish_many(messages, qos=1)
            published += due
        time.sleep(0.002)
    deadline = time.monotonic() + 60
    while acked[0] < len(births) + published + attacks_sent and time.monotonic() < deadline:
        time.sleep(0.01)
    cpu = time.process_time() - cpu0
    client.stop()
    out.put({"published": published, "acked": acked[0] - len(births) - attacks_sent, "cpu_s": cpu,
             "attacks_sent": attacks_sent, "targets": [t.rsplit("/", 1)[1] for t in targets]})


class TwinProcess:
    """The twin in its own process (`python -m twin.service`), so that it can be SIGKILLed."""

    def __init__(self, config: dict, workdir: Path):
        self.path = workdir / "twin-process.json"
        self.path.write_text(json.dumps(config))
        self.log = workdir / "twin-process.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> TwinProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "twin.service", str(self.path)], env=env,
                                     stdout=subprocess.PIPE, stderr=self.log.open("ab"), text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the twin did not start: {self.log.read_text()[-2000:]}")
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _expected_rows(results: list[dict]) -> dict[str, int]:
    """Rows each device must have: publisher message k went to targets[k % len(targets)] with serial
    k // len(targets), so a device got ceil((published - index) / len(targets)) serials, 0 upwards."""
    expected: dict[str, int] = {}
    for r in results:
        n = len(r["targets"])
        for i, device in enumerate(r["targets"]):
            expected[device] = max(0, (r["published"] - i + n - 1) // n)
    return expected


def _reconcile(store, expected: dict[str, int]) -> dict[str, int]:
    """Lost: sent and acknowledged by the broker, not in the history. Duplicated: rows beyond one per
    (device, serial). Unexpected: rows the publishers never sent as legitimate data."""
    lost = unexpected = 0
    for device, rows in expected.items():
        stored = set(store.seqs(device))
        lost += len(set(range(rows)) - stored)
        unexpected += len(stored - set(range(rows)))
    total, distinct = store.query("SELECT COUNT(*), COUNT(DISTINCT device || '/' || seq) FROM history")[0]
    return {"lost": lost, "duplicated": total - distinct, "unexpected": unexpected, "stored": total}


def run_rate(*, rate: float, seconds: float, warmup: float, machines: int, nodes: int, publishers: int,
             db: str | None, workdir: Path, attack: float = 0.0, kill_cycles: int = 0,
             broker_kind: str = "mosquitto", payload: str = "json") -> dict:
    from tests.services import EmbeddedBroker, Mosquitto
    from twin.domain.plant import Plant
    from twin.service import TwinConfig, TwinService
    from twin.store.history import HistoryStore

    plant = Plant.generated(machines=machines, nodes=nodes)
    node_devices = plant.nodes
    node_ids = sorted(node_devices)
    tag = f"{int(rate)}-a{attack:g}-k{kill_cycles}-{payload}"
    db = db or str(workdir / f"twin-{tag}.db")
    config = {"broker_port": 0, "db": db, "client_id": f"bench-twin-{tag}", "work_orders_csv": None}
    # the built-in broker runs in this process: only with --kill-cycles, where the twin has its own
    broker_service = (EmbeddedBroker() if broker_kind == "builtin" else
                      Mosquitto(workdir=workdir / f"mq-{tag}", persistence=False))
    with broker_service as broker:
        config["broker_port"] = broker.port
        if kill_cycles:
            twin = TwinProcess({**config, "generated_plant": {"machines": machines, "nodes": nodes}},
                               workdir).start()
            service = None
        else:
            service = TwinService(config=TwinConfig(**config), plant=plant).start()
            service.wait_connected()
        ctx = mp.get_context("spawn")
        out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(
            daemon=True, target=publish_load, args=(broker.port, plant.group, node_ids[k::publishers],
                                       {n: node_devices[n] for n in node_ids[k::publishers]}, rate / publishers,
                                       warmup + seconds, k, out, ready, go, attack, payload))
                 for k in range(publishers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)  # connected, births acknowledged
        go.set()
        time.sleep(warmup)
        if service is not None:
            service.latency_ms.clear()
            service.state_latency_ms.clear()
            committed0 = service.committed
        t0, wall0, cpu0, broker0 = time.monotonic(), time.time(), time.process_time(), _cpu(broker)
        kill_times = [seconds * (i + 1) / (kill_cycles + 1) for i in range(kill_cycles)]
        for at in kill_times:  # SIGKILL mid-stream, restart at once: the broker queues meanwhile
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            twin.kill()
            twin.start()
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
        t1, wall1, cpu1, broker1 = time.monotonic(), time.time(), time.process_time(), _cpu(broker)
        if service is not None:
            committed1 = service.committed
            window_latency = np.fromiter(service.latency_ms, float)
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        acked = sum(r["acked"] for r in results)
        expected = _expected_rows(results)
        store = HistoryStore(db)
        deadline = time.monotonic() + 120
        while store.count("history") < sum(expected.values()) and time.monotonic() < deadline:
            time.sleep(0.2)  # drain what is still queued (after a kill: what the broker kept for the twin)
        if service is not None:
            service.store.flush()
            counters = dict(service.state.counters)
            service.stop()
        else:
            twin.stop()
            counters = {}
        counts = _reconcile(store, expected)
        in_window = store.query("SELECT received_ms - ts_ms FROM history WHERE received_ms >= ? AND received_ms < ?",
                                (int(wall0 * 1000), int(wall1 * 1000)))
        dead_letters = store.count("dead_letters")
        store.close()
    state_latency = np.array([r[0] for r in in_window], float)
    if service is not None:
        ingested = max(1, committed1 - committed0)
        sustained = (committed1 - committed0) / (t1 - t0)
    else:  # rows the twin processes took in during the window, whichever process it was
        ingested = max(1, len(in_window))
        sustained = len(in_window) / (wall1 - wall0)
        window_latency = np.zeros(0)
    cpu_per_msg = {"twin_us": (cpu1 - cpu0) / ingested * 1e6 if service is not None else None,
                   "broker_us": (broker1 - broker0) / ingested * 1e6 if broker0 is not None else None,
                   "publishers_us": sum(r["cpu_s"] for r in results) / max(1, acked) * 1e6}
    projected = None
    if service is not None:
        total = sum(cpu_per_msg.values()) / 1e6
        # not a measurement: what this CPU cost per message would allow on 2 idle cores (the twin's Python is
        # one core at most: one GIL)
        projected = min(1e6 / cpu_per_msg["twin_us"], 2.0 / total)

    def pct(values: np.ndarray, q: float) -> float | None:
        return float(np.percentile(values, q)) if values.size else None

    attacks = sum(r["attacks_sent"] for r in results)
    return {"target_rate": rate, "payload": payload, "sustained_rate": sustained, "attack": attack,
            "kill_cycles": kill_cycles,
            "cpu_per_msg": cpu_per_msg, "projected_rate_2_idle_cores": projected,
            "latency_p50_ms": pct(window_latency, 50), "latency_p99_ms": pct(window_latency, 99),
            "state_latency_p50_ms": pct(state_latency, 50), "state_latency_p99_ms": pct(state_latency, 99),
            "published": sum(r["published"] for r in results), "acked_by_broker": acked, "stored": counts["stored"],
            "lost": counts["lost"], "duplicated": counts["duplicated"], "unexpected_rows": counts["unexpected"],
            "attacks_sent": attacks, "dead_letters": dead_letters,
            "duplicates_dropped": counters.get("duplicate", 0) if service is not None else None, "devices": machines}


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used; 0.0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu(cluster) -> float:
    """CPU seconds of the PostgreSQL cluster: its postmaster and every process it started (the backends)."""
    postmaster = int((cluster.dir / "data" / "postmaster.pid").read_text().split()[0])
    total = _proc_cpu(postmaster)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                total += _proc_cpu(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return total


class WorkerProcesses:
    """`workers` twin workers (`python -m twin.scaleout`), one process each, sharing one PostgreSQL database;
    0: the single twin (`python -m twin.service`) on the same database, the baseline."""

    def __init__(self, *, workers: int, config: dict, workdir: Path, lease_s: float):
        self.procs: list[subprocess.Popen] = []
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for k in range(max(1, workers)):
            path = workdir / f"worker-{k}.json"
            scale = {"scale": {"worker": f"w{k}", "slots": workers, "home_slot": k, "lease_s": lease_s}}
            path.write_text(json.dumps({**config, **(scale if workers else {})}))
            module = "twin.scaleout.worker" if workers else "twin.service"
            self.procs.append(subprocess.Popen([sys.executable, "-m", module, str(path)], env=env,
                                               stdout=subprocess.PIPE, stderr=(workdir / f"worker-{k}.log").open("ab"),
                                               text=True))
        for k, proc in enumerate(self.procs):
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker {k} did not start: {(workdir / f'worker-{k}.log').read_text()[-2000:]}")

    def cpu(self) -> list[float]:
        return [_proc_cpu(p.pid) for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_workers(*, workers: int, rate: float, seconds: float, warmup: float, machines: int, nodes: int,
                publishers: int, cluster, workdir: Path, kill_worker: bool, lease_s: float,
                payload: str = "json", repeat: int = 0) -> dict:
    """One run of `workers` scaled-out twin workers (twin/scaleout.py) on Mosquitto and PostgreSQL. With
    `kill_worker` the last worker is SIGKILLed halfway through the window and not restarted: the others
    adopt its MQTT session and its nodes; lost/duplicated rows are counted against the publishers' acks."""
    import psycopg

    from tests.services import Mosquitto
    from twin.domain.plant import Plant
    from twin.store.history import HistoryStore

    plant = Plant.generated(machines=machines, nodes=nodes)
    node_ids = sorted(plant.nodes)
    tag = f"w{workers}_{int(rate)}_{payload}_{'kill' if kill_worker else 'run'}_r{repeat}"
    with psycopg.connect(cluster.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE bench_{tag}")
    db = cluster.url.rsplit("/", 1)[0] + f"/bench_{tag}"
    with Mosquitto(workdir=workdir / f"mq-{tag}", persistence=False) as broker:
        config = {"broker_port": broker.port, "db": db, "client_id": f"bench-{tag}", "work_orders_csv": None,
                  "generated_plant": {"machines": machines, "nodes": nodes}}
        group = WorkerProcesses(workers=workers, config=config, workdir=workdir, lease_s=lease_s)
        store = HistoryStore(db)
        deadline = time.monotonic() + 60
        while workers and time.monotonic() < deadline and store.query(
                "SELECT COUNT(DISTINCT holder) FROM twin_slots WHERE holder IS NOT NULL")[0][0] < workers:
            time.sleep(0.1)  # every worker holds its MQTT session (rebalanced after start-up)
        time.sleep(lease_s if workers else 0.5)  # and the nodes have settled on their owners
        ctx = mp.get_context("spawn")
        out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(
            daemon=True, target=publish_load, args=(broker.port, plant.group, node_ids[k::publishers],
                                                    {n: plant.nodes[n] for n in node_ids[k::publishers]},
                                                    rate / publishers, warmup + seconds, k, out, ready, go, 0.0,
                                                    payload))
            for k in range(publishers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        go.set()
        time.sleep(warmup)
        t0, wall0 = time.monotonic(), time.time()
        cpu0, broker0, pg0 = group.cpu(), _cpu(broker), _postgres_cpu(cluster)
        killed_cpu = None
        if kill_worker:
            time.sleep(seconds / 2)
            killed_cpu = group.cpu()[-1]  # what it used until it died
            group.procs[-1].send_signal(signal.SIGKILL)
            group.procs[-1].wait()
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
        wall1, cpu1, broker1, pg1 = time.time(), group.cpu(), _cpu(broker), _postgres_cpu(cluster)
        if killed_cpu is not None:
            cpu1[-1] = killed_cpu
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        expected = _expected_rows(results)
        deadline = time.monotonic() + 120
        while store.count("history") < sum(expected.values()) and time.monotonic() < deadline:
            time.sleep(0.2)  # drain: after a kill, what the dead worker's session kept comes via its adopter
        counts = _reconcile(store, expected)
        in_window = store.query("SELECT COUNT(*), PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY received_ms - ts_ms), "
                                "PERCENTILE_CONT(0.99) WITHIN GROUP (ORDER BY received_ms - ts_ms) FROM history "
                                "WHERE received_ms >= ? AND received_ms < ?",
                                (int(wall0 * 1000), int(wall1 * 1000)))[0]
        double_alarms = store.query("SELECT COUNT(*) FROM (SELECT device, kind, metric FROM alarms GROUP BY "
                                    "device, kind, metric HAVING COUNT(*) > 1) AS twice")[0][0]
        store.close()
        group.stop()
    window = wall1 - wall0
    applied = max(1, in_window[0])
    worker_cpu = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    acked = sum(r["acked"] for r in results)
    return {"workers": workers, "target_rate": rate, "kill_worker": kill_worker, "payload": payload, "repeat": repeat,
            "sustained_rate": in_window[0] / window, "worker_cpu_s": worker_cpu, "window_s": window,
            "cpu_per_msg": {"workers_us": sum(worker_cpu) / applied * 1e6,
                            "broker_us": (broker1 - broker0) / applied * 1e6,
                            "postgres_us": (pg1 - pg0) / applied * 1e6,
                            "publishers_us": sum(r["cpu_s"] for r in results) / max(1, acked) * 1e6},
            "msg_per_worker_cpu_s": applied / max(1e-9, sum(worker_cpu)),
            "state_latency_p50_ms": in_window[1], "state_latency_p99_ms": in_window[2],
            "published": sum(r["published"] for r in results), "acked_by_broker": acked, "stored": counts["stored"],
            "lost": counts["lost"], "duplicated": counts["duplicated"], "unexpected_rows": counts["unexpected"],
            "alarms_raised_twice": double_alarms, "devices": machines}


def workers_main(args, console: Console) -> None:
    """`--workers 1,2`: the scaled-out twin side by side for each worker count, then (`--kill-worker`) a
    fault run with the largest count at the first rate."""
    from tests.services import PostgresCluster

    counts = [int(w) for w in args.workers.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    measured_on = common.machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="moeworks-bench-workers-") as tmp, PostgresCluster() as cluster:
        payloads = args.payload.split(",")
        # --repeats: the whole plan again, so the counts alternate under whatever load the machine has
        plan = [(w, rate, False, payload, rep) for rep in range(args.repeats) for payload in payloads
                for rate in rates for w in counts]
        if args.kill_worker and max(counts) >= 2:
            plan.append((max(counts), rates[0], True, payloads[0], 0))  # the fault run at the first rate
        for workers, rate, kill, payload, rep in plan:
            console.log(f"{workers} worker(s), target {rate:,.0f} msg/s of {payload}, {args.seconds:g} s"
                        f"{', SIGKILL of one worker halfway' if kill else ''} (repeat {rep + 1}) ...")
            workdir = Path(tmp) / f"w{workers}-{int(rate)}-{payload}-{kill}-{rep}"
            workdir.mkdir()
            runs.append(run_workers(workers=workers, rate=rate, seconds=args.seconds, warmup=args.warmup,
                                    machines=args.machines, nodes=args.nodes, publishers=args.publishers,
                                    cluster=cluster, workdir=workdir, kill_worker=kill, lease_s=args.lease_s,
                                    payload=payload, repeat=rep))
    # Scaling read off CPU cost (the 2 shared cores cannot give each worker a core of its own): N workers, each
    # on a core, would apply N x (messages per worker CPU-second) a second; against one worker's the same way.
    for r in runs:
        one = next((o for o in runs if o["workers"] == 1 and o["target_rate"] == r["target_rate"]
                    and o["payload"] == r["payload"] and not o["kill_worker"] and o["repeat"] == r["repeat"]), None)
        r["scaling_vs_1_worker"] = (r["workers"] * r["msg_per_worker_cpu_s"] / one["msg_per_worker_cpu_s"]
                                    if one is not None and r["workers"] and not r["kill_worker"] else None)
    table = Table(title=f"scaled-out twin (Mosquitto + PostgreSQL), {args.machines} devices, "
                        f"{measured_on['logical_cores']} CPUs shared by every process (load "
                        f"{measured_on['load_average'][0]:.1f} at start)")
    for col in ("workers", "kill", "payload", "target msg/s", "sustained msg/s", "state p50 ms", "state p99 ms",
                "workers CPU us/msg", "PG us/msg", "broker us/msg", "msg per worker CPU-s", "x 1 worker (CPU)",
                "acked", "lost", "duplicated", "alarms twice"):
        table.add_column(col, justify="right")
    for r in runs:
        cpu = r["cpu_per_msg"]
        table.add_row(str(r["workers"]) if r["workers"] else "single twin", "yes" if r["kill_worker"] else "no",
                      r["payload"], f"{r['target_rate']:,.0f}",
                      f"{r['sustained_rate']:,.0f}", f"{r['state_latency_p50_ms'] or 0:.0f}",
                      f"{r['state_latency_p99_ms'] or 0:.0f}", f"{cpu['workers_us']:.0f}", f"{cpu['postgres_us']:.0f}",
                      f"{cpu['broker_us']:.0f}", f"{r['msg_per_worker_cpu_s']:,.0f}",
                      "-" if r["scaling_vs_1_worker"] is None else f"{r['scaling_vs_1_worker']:.2f}x",
                      f"{r['acked_by_broker']:,}",
                      str(r["lost"]), str(r["duplicated"]), str(r["alarms_raised_twice"]))
    console.print(table)
    summary = []  # medians over the repeats, per (workers, rate, payload)
    for key in sorted({(r["workers"], r["target_rate"], r["payload"]) for r in runs if not r["kill_worker"]}):
        same = [r for r in runs if (r["workers"], r["target_rate"], r["payload"]) == key and not r["kill_worker"]]
        scaling = [r["scaling_vs_1_worker"] for r in same if r["scaling_vs_1_worker"] is not None]
        summary.append({"workers": key[0], "target_rate": key[1], "payload": key[2], "runs": len(same),
                        "workers_us_median": statistics.median(r["cpu_per_msg"]["workers_us"] for r in same),
                        "postgres_us_median": statistics.median(r["cpu_per_msg"]["postgres_us"] for r in same),
                        "msg_per_worker_cpu_s_median": statistics.median(r["msg_per_worker_cpu_s"] for r in same),
                        "scaling_vs_1_worker_median": statistics.median(scaling) if scaling else None})
        s = summary[-1]
        console.print(f"{'single twin' if not key[0] else f'{key[0]} worker(s)'} at {key[1]:,.0f} msg/s of {key[2]}, "
                      f"median of {len(same)}: workers {s['workers_us_median']:.0f} us/msg, PostgreSQL "
                      f"{s['postgres_us_median']:.0f} us/msg, {s['msg_per_worker_cpu_s_median']:,.0f} msg per worker "
                      f"CPU-s" + (f", {s['scaling_vs_1_worker_median']:.2f}x one worker" if scaling else ""))
    common.write_results({"benchmark": "twin_workers", "machine": measured_on, "summary": summary,
                          "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                          "target": {"lost": 0, "duplicated": 0, "scaling_2_workers": 1.7}}, args.out,
                         as_json=args.json)


def _cpu(broker) -> float:
    """CPU seconds (user + system) the Mosquitto process has used (None: the built-in broker, in this process)."""
    if getattr(broker, "process", None) is None:
        return None
    fields = Path(f"/proc/{broker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def state_bytes_per_device(devices: int) -> float:
    """Memory of the plant model and live state per device, after one data message each (tracemalloc)."""
    from twin.domain.health import default_health_models
    from twin.domain.plant import Plant
    from twin.domain.state import TwinState

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    plant = Plant.generated(machines=devices, nodes=max(1, devices // 20))
    state = TwinState(plant=plant, health_models=default_health_models())
    payload = json.dumps({"timestamp": 1, "seq": 0, "metrics": [
        {"name": "product_type", "value": "L"}, {"name": "air_temperature", "value": 300.1},
        {"name": "process_temperature", "value": 310.2}, {"name": "rotational_speed", "value": 1500.0},
        {"name": "torque", "value": 40.0}, {"name": "tool_wear", "value": 10.0}]}).encode()
    for machine in plant.machines.values():
        state.apply(f"spBv1.0/{plant.group}/DDATA/{machine.node}/{machine.id}", payload, 0)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2000,5000,8000", help="target total msg/s, one run each")
    add_mqtt_load_arguments(parser)
    parser.add_argument("--db", default=None, help="postgresql:// URL (default: SQLite in a temp dir)")
    parser.add_argument("--attack", type=float, default=0.0,
                        help="forged messages per legitimate one (0.01: 1%%): malformed, oversized, out of range, "
                             "spoofed seq and bdSeq, in turn")
    parser.add_argument("--broker", choices=("mosquitto", "builtin"), default="mosquitto",
                        help="builtin: `moeworks twin broker` (amqtt), only with --kill-cycles")
    parser.add_argument("--kill-cycles", type=int, default=0,
                        help="SIGKILL and restart the twin (its own process) this many times during each window")
    parser.add_argument("--payload", default="json",
                        help="payload encodings, comma-separated, each rate once per encoding: json, protobuf "
                             "(default json: the encoding of the figures recorded before protobuf existed; "
                             "--attack's forged messages stay JSON, the twin reads both)")
    parser.add_argument("--workers", default=None,
                        help="e.g. 0,1,2: the scaled-out twin (twin/scaleout.py) with this many worker processes, "
                             "side by side, on Mosquitto and a throwaway PostgreSQL (0: the single twin process)")
    parser.add_argument("--kill-worker", action="store_true",
                        help="with --workers: a fault run more, SIGKILL of one worker halfway through the window")
    parser.add_argument("--lease-s", type=float, default=3.0, help="with --workers: the workers' lease")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the whole plan this many times (variants alternating), medians printed at the end")
    common.add_output_arguments(parser, Path("runs/bench/twin.json"))
    args = parser.parse_args()
    if not 0.0 <= args.attack <= 0.5 or args.kill_cycles < 0 or args.seconds <= 0 or not 1 <= args.repeats <= 20:
        parser.error("--attack must be in [0, 0.5], --kill-cycles >= 0, --seconds > 0, --repeats 1..20")
    payloads = args.payload.split(",")
    if not payloads or any(p not in PAYLOADS for p in payloads):
        parser.error(f"--payload takes a comma-separated list of {', '.join(PAYLOADS)}")
    if args.broker == "builtin" and not args.kill_cycles:
        parser.error("--broker builtin needs --kill-cycles (the twin then runs in its own process)")
    console = Console()
    if args.workers is not None:
        if not re.fullmatch(r"\d+(,\d+)*", args.workers) or not all(0 <= int(w) <= 16
                                                                    for w in args.workers.split(",")):
            parser.error("--workers must be a list of counts 0..16 (0: the single twin, the baseline), e.g. 0,1,2")
        if args.attack or args.kill_cycles or args.db or args.broker != "mosquitto":
            parser.error("--workers runs its own Mosquitto and PostgreSQL, without --attack/--kill-cycles/--db")
        workers_main(args, console)
        return
    if args.kill_worker:
        parser.error("--kill-worker needs --workers")
    measured_on = common.machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="moeworks-bench-twin-") as tmp:
        for rep in range(args.repeats):
            workdir = Path(tmp) / f"r{rep}"
            workdir.mkdir()
            for rate in [float(r) for r in args.rates.split(",")]:
                for payload in payloads:  # encodings back to back at each rate: the same machine load for both
                    console.log(f"target {rate:,.0f} msg/s of {payload} over {args.machines} devices for "
                                f"{args.seconds:g} s (repeat {rep + 1}) ...")
                    runs.append(run_rate(rate=rate, seconds=args.seconds, warmup=args.warmup,
                                         machines=args.machines, nodes=args.nodes, publishers=args.publishers,
                                         db=args.db, workdir=workdir, attack=args.attack,
                                         kill_cycles=args.kill_cycles, broker_kind=args.broker, payload=payload)
                                | {"repeat": rep})
    per_device = {n: state_bytes_per_device(n) for n in (1_000, 20_000)}
    capacity = {"state_bytes_per_device": per_device[20_000],
                "devices_per_gib_of_state": int(2**30 / per_device[20_000])}
    base = runs[0]["sustained_rate"]
    table = Table(title=f"twin ingestion via {args.broker}, {args.machines} devices, {measured_on['logical_cores']} "
                        f"CPUs (load {measured_on['load_average'][0]:.1f} at start)")
    for col in ("target msg/s", "payload", "sustained msg/s", "vs first", "p50 ms", "p99 ms", "state p99 ms", "acked",
                "stored", "lost", "duplicated", "attacks", "dead letters", "kills", "twin CPU us/msg",
                "all CPU us/msg"):
        table.add_column(col, justify="right")

    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in runs:
        cpu = r["cpu_per_msg"]
        table.add_row(f"{r['target_rate']:,.0f}", r["payload"], f"{r['sustained_rate']:,.0f}",
                      f"{r['sustained_rate'] / base:.2f}x",
                      num(r["latency_p50_ms"], ".1f"), num(r["latency_p99_ms"], ".1f"),
                      num(r["state_latency_p99_ms"], ".1f"), f"{r['acked_by_broker']:,}", f"{r['stored']:,}",
                      str(r["lost"]), str(r["duplicated"]), str(r["attacks_sent"]), str(r["dead_letters"]),
                      str(r["kill_cycles"]), num(cpu["twin_us"], ".0f"),
                      num(None if cpu["twin_us"] is None else sum(cpu.values()), ".0f"))
    console.print(table)
    console.print(f"live state: {capacity['state_bytes_per_device']:,.0f} bytes/device -> "
                  f"{capacity['devices_per_gib_of_state']:,} devices per GiB")
    summary = []  # the twin's CPU per message, median over the repeats, per (rate, payload)
    for key in sorted({(r["target_rate"], r["payload"]) for r in runs}):
        same = [r["cpu_per_msg"]["twin_us"] for r in runs if (r["target_rate"], r["payload"]) == key
                and r["cpu_per_msg"]["twin_us"] is not None]
        if same:
            summary.append({"target_rate": key[0], "payload": key[1], "runs": len(same),
                            "twin_us_median": statistics.median(same)})
            console.print(f"{key[0]:,.0f} msg/s of {key[1]}: twin CPU {summary[-1]['twin_us_median']:.1f} us/msg, "
                          f"median of {len(same)} ({', '.join(f'{v:.1f}' for v in same)})")
    result = {"benchmark": "twin_ingestion", "machine": measured_on, "args": {k: str(v) for k, v in vars(args).items()},
              "runs": runs, "capacity": capacity, "summary": summary,
              "target": {"rate": 5000, "p99_ms": 250, "lost": 0, "duplicated": 0}}
    common.write_results(result, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
