"""Digital twin ingestion through Mosquitto on loopback: sustained messages/s, loss, latency, capacity.

Publisher processes simulate many AI4I-type devices (NBIRTH/DBIRTH, then DDATA at QoS 1 with
seq numbers) at a target total rate; the twin (this process) ingests into state, alarms, health
and SQLite history. For each target rate: the rate of messages committed to history during the
measured window, end-to-end latency (edge timestamp -> history row committed) p50/p99, and loss
(messages the broker acknowledged to the publishers minus rows in history, after draining); also
publish -> state updated p50/p99.
Capacity: memory the twin's live state takes per device.

    python benchmarks/twin.py --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

# run as a script, this file's folder comes first on sys.path and `twin` would import this file
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))
from benchmarks import common  # noqa: E402

DDATA_TEMPLATE = ('{"timestamp":%d,"seq":%d,"metrics":[{"name":"product_type","value":"L"},'
                  '{"name":"air_temperature","value":%.1f},{"name":"process_temperature","value":%.1f},'
                  '{"name":"rotational_speed","value":%d},{"name":"torque","value":%.1f},'
                  '{"name":"tool_wear","value":%d.0}]}')


NOISE_BLOCK = 8192


def _readings(rng: np.random.Generator, n: int) -> list[list]:
    """Air and process temperature (K), speed (rpm, integer), torque (Nm) for n messages: lists of n."""
    return [(300 + rng.normal(0, 2, n)).tolist(), (310 + rng.normal(0, 1, n)).tolist(),
            np.rint(1500 + rng.normal(0, 50, n)).astype(np.int64).tolist(), (40 + rng.normal(0, 5, n)).tolist()]


def publish_load(port: int, group: str, nodes: list[str], devices: dict[str, list[str]], rate: float,
                 seconds: float, seed: int, out: mp.Queue, ready: mp.Queue, go) -> None:
    """One publisher process: births for its nodes and devices, then DDATA at `rate` msg/s for `seconds`.

    Each DDATA is a real Sparkplug-style message (its device's next seq, the edge clock in ms, six AI4I
    metrics) at QoS 1, counted as acknowledged on the broker's PUBACK. To leave the shared CPUs to the
    twin, it is made cheaply: the random readings for a whole tick come from numpy at once, the JSON
    from a template, and a tick's messages leave in one write (twin.mqtt_burst, as the twin receives).
    """
    from twin.mqtt_burst import BurstClient, BurstClientConfig

    acked = [0]
    client = BurstClient(config=BurstClientConfig(port=port, client_id=f"bench-pub-{seed}", keepalive_s=30),
                         on_acked=lambda mids: acked.__setitem__(0, acked[0] + len(mids))).start()
    client.wait_connected(30)
    rng = np.random.default_rng(seed)
    births = []
    for node in nodes:
        stamp = int(time.time() * 1000)
        births.append((f"spBv1.0/{group}/NBIRTH/{node}", json.dumps({"timestamp": stamp, "seq": 0,
                                                                   "bdSeq": 0}).encode()))
        births += [(f"spBv1.0/{group}/DBIRTH/{node}/{d}", json.dumps({"timestamp": stamp, "seq": 0}).encode())
                   for d in devices[node]]
    client.publish_many(births, qos=1)
    targets = [f"spBv1.0/{group}/DDATA/{node}/{d}" for node in nodes for d in devices[node]]
    deadline = time.monotonic() + 60
    while acked[0] < len(births) and time.monotonic() < deadline:
        time.sleep(0.01)
    ready.put(seed)
    go.wait(120)  # all publishers start together, so the measured window sees the whole offered rate
    published, per_round, noise = 0, len(targets), None
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
                seq = k // per_round  # message k goes to device k % per_round: its seq is the round number
                messages.append((targets[k % per_round], (DDATA_TEMPLATE % (
                    stamp, seq, noise[0][j], noise[1][j], noise[2][j], noise[3][j], seq % 200)).encode()))
            client.publish_many(messages, qos=1)
            published += due
        time.sleep(0.002)
    deadline = time.monotonic() + 60
    while acked[0] < len(births) + published and time.monotonic() < deadline:
        time.sleep(0.01)
    cpu = time.process_time() - cpu0
    client.stop()
    out.put({"published": published, "acked": acked[0] - len(births), "cpu_s": cpu})


def run_rate(*, rate: float, seconds: float, warmup: float, machines: int, nodes: int, publishers: int,
             db: str | None, workdir: Path) -> dict:
    from twin.plant import Plant
    from twin.service import TwinConfig, TwinService
    from twin.services import Mosquitto

    plant = Plant.generated(machines=machines, nodes=nodes)
    node_devices = plant.nodes
    node_ids = sorted(node_devices)
    with Mosquitto(workdir=workdir / f"mq-{int(rate)}", persistence=False) as broker:
        service = TwinService(config=TwinConfig(broker_port=broker.port, db=db or str(workdir / f"twin-{int(rate)}.db"),
                                                client_id=f"bench-twin-{int(rate)}"), plant=plant).start()
        service.wait_connected()
        ctx = mp.get_context("spawn")
        out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(
            daemon=True, target=publish_load, args=(broker.port, plant.group, node_ids[k::publishers],
                                       {n: node_devices[n] for n in node_ids[k::publishers]}, rate / publishers,
                                       warmup + seconds, k, out, ready, go)) for k in range(publishers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)  # connected, births acknowledged
        go.set()
        time.sleep(warmup)
        service.latency_ms.clear()
        service.state_latency_ms.clear()
        committed0, t0, cpu0, broker0 = service.committed, time.monotonic(), time.process_time(), _cpu(broker)
        time.sleep(seconds)
        committed1, t1, cpu1, broker1 = service.committed, time.monotonic(), time.process_time(), _cpu(broker)
        window_latency = np.fromiter(service.latency_ms, float)
        state_latency = np.fromiter(service.state_latency_ms, float)
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        acked = sum(r["acked"] for r in results)
        deadline = time.monotonic() + 60
        while service.committed < acked and time.monotonic() < deadline:  # drain what is still queued
            time.sleep(0.05)
        service.store.flush()
        stored = service.store.count("history")
        counters = dict(service.state.counters)
        service.stop()
    ingested = max(1, committed1 - committed0)
    cpu_per_msg = {"twin_us": (cpu1 - cpu0) / ingested * 1e6, "broker_us": (broker1 - broker0) / ingested * 1e6,
                   "publishers_us": sum(r["cpu_s"] for r in results) / max(1, acked) * 1e6}
    total = sum(cpu_per_msg.values()) / 1e6
    # not a measurement: what this CPU cost per message would allow on 2 idle cores (the twin's Python is
    # one core at most: one GIL)
    projected = min(1e6 / cpu_per_msg["twin_us"], 2.0 / total)
    return {"target_rate": rate, "sustained_rate": (committed1 - committed0) / (t1 - t0),
            "cpu_per_msg": cpu_per_msg, "projected_rate_2_idle_cores": projected,
            "latency_p50_ms": float(np.percentile(window_latency, 50)) if window_latency.size else None,
            "latency_p99_ms": float(np.percentile(window_latency, 99)) if window_latency.size else None,
            "state_latency_p50_ms": float(np.percentile(state_latency, 50)) if state_latency.size else None,
            "state_latency_p99_ms": float(np.percentile(state_latency, 99)) if state_latency.size else None,
            "published": sum(r["published"] for r in results), "acked_by_broker": acked, "stored": stored,
            "lost": acked - stored, "duplicates": counters.get("duplicate", 0),
            "dead_letters": counters.get("dead_letter", 0), "devices": machines}


def _cpu(broker) -> float:
    """CPU seconds (user + system) the Mosquitto process has used."""
    fields = Path(f"/proc/{broker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def state_bytes_per_device(devices: int) -> float:
    """Memory of the plant model and live state per device, after one data message each (tracemalloc)."""
    from twin.health import default_health_models
    from twin.plant import Plant
    from twin.state import TwinState

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
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per rate")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--db", default=None, help="postgresql:// URL (default: SQLite in a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/twin.json"))
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    args = parser.parse_args()
    console = Console()
    measured_on = common.machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="moeworks-bench-twin-") as tmp:
        for rate in [float(r) for r in args.rates.split(",")]:
            console.log(f"target {rate:,.0f} msg/s over {args.machines} devices for {args.seconds:g} s ...")
            runs.append(run_rate(rate=rate, seconds=args.seconds, warmup=args.warmup, machines=args.machines,
                                 nodes=args.nodes, publishers=args.publishers, db=args.db, workdir=Path(tmp)))
    per_device = {n: state_bytes_per_device(n) for n in (1_000, 20_000)}
    capacity = {"state_bytes_per_device": per_device[20_000],
                "devices_per_gib_of_state": int(2**30 / per_device[20_000])}
    base = runs[0]["sustained_rate"]
    table = Table(title=f"twin ingestion via Mosquitto, {args.machines} devices, {measured_on['logical_cores']} "
                        f"CPUs (load {measured_on['load_average'][0]:.1f} at start)")
    for col in ("target msg/s", "sustained msg/s", "vs first", "p50 ms", "p99 ms", "state p99 ms", "acked", "stored",
                "lost", "twin CPU us/msg", "all CPU us/msg"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(f"{r['target_rate']:,.0f}", f"{r['sustained_rate']:,.0f}", f"{r['sustained_rate'] / base:.2f}x",
                      f"{r['latency_p50_ms']:.1f}", f"{r['latency_p99_ms']:.1f}", f"{r['state_latency_p99_ms']:.1f}",
                      f"{r['acked_by_broker']:,}",
                      f"{r['stored']:,}", str(r["lost"]), f"{r['cpu_per_msg']['twin_us']:.0f}",
                      f"{sum(r['cpu_per_msg'].values()):.0f}")
    console.print(table)
    console.print(f"live state: {capacity['state_bytes_per_device']:,.0f} bytes/device -> "
                  f"{capacity['devices_per_gib_of_state']:,} devices per GiB")
    result = {"benchmark": "twin_ingestion", "machine": measured_on, "args": {k: str(v) for k, v in vars(args).items()},
              "runs": runs, "capacity": capacity,
              "target": {"rate": 5000, "p99_ms": 250, "lost": 0}}
    common.write_results(result, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
