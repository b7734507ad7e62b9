"""Digital twin ingestion with TLS and authentication against plaintext, side by side in one run.

Both modes run the same load through Debian's Mosquitto on loopback: N AI4I-type devices on M edge
nodes, each edge node its own MQTT connection (as in the field, where each node logs in as itself),
publishing DDATA at QoS 1 at a target total rate from publisher processes; the twin (this process)
ingests into state, alarms and SQLite history.

- plaintext: anonymous clients, no TLS (the broker `benchmarks/twin.py` measures);
- tls+auth: the config `moeworks twin mosquitto-config` writes (TLS listener, a password per node
  and for the twin, the per-node ACL, message_size_limit), every client checking the broker's
  certificate against the CA (made for the run with tests/mqtt_certs.py; nothing kept).

Reported per mode: messages/s committed to history in the measured window, edge timestamp ->
history committed p50/p99, -> state p99, acked vs stored (loss), CPU per message; and the ratio
of the TLS rate to the plaintext rate (target >= 0.8, p99 < 250 ms at 5,000 msg/s offered).

    python -m benchmarks.twin_tls --json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks import common
from benchmarks.fixtures import add_mqtt_load_arguments

TWIN_USER = "moeworks-twin"
DDATA = ('{"timestamp":%d,"seq":%d,"metrics":[{"name":"product_type","value":"L"},'
         '{"name":"air_temperature","value":%.1f},{"name":"process_temperature","value":%.1f},'
         '{"name":"rotational_speed","value":%d},{"name":"torque","value":%.1f},{"name":"tool_wear","value":%d.0}]}')


def publish_nodes(port: int, group: str, devices: dict[str, list[str]], logins: dict, rate: float, seconds: float,
                  seed: int, out: mp.Queue, ready: mp.Queue, go) -> None:
    """One publisher process: one connection per edge node (logged in as that node when `logins`
    holds it), births, then DDATA for the nodes' devices at `rate` msg/s in total for `seconds`."""
    from twin.mqtt.burst_client import BurstClient, BurstClientConfig

    acked = [0]
    count = lambda mids: acked.__setitem__(0, acked[0] + len(mids))  # noqa: E731 (one counter, all clients)
    clients = {node: BurstClient(config=BurstClientConfig(port=port, client_id=f"{group}-{node}", keepalive_s=30,
                                                          security=logins.get(node)), on_acked=count).start()
               for node in devices}
    for client in clients.values():
        client.wait_connected(60)
    births = 0
    for node, client in clients.items():
        stamp = int(time.time() * 1000)
        messages = [(f"spBv1.0/{group}/NBIRTH/{node}", b'{"timestamp":%d,"seq":0,"bdSeq":0}' % stamp)]
        messages += [(f"spBv1.0/{group}/DBIRTH/{node}/{d}", b'{"timestamp":%d,"seq":0}' % stamp) for d in devices[node]]
        client.publish_many(messages, qos=1)
        births += len(messages)
    deadline = time.monotonic() + 60
    while acked[0] < births and time.monotonic() < deadline:
        time.sleep(0.01)
    ready.put(seed)
    go.wait(120)
    targets = [(node, f"spBv1.0/{group}/DDATA/{node}/{d}") for node in devices for d in devices[node]]
    rng = np.random.default_rng(seed)
    published, start, cpu0 = 0, time.monotonic(), time.process_time()
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(rate * elapsed) - published
        if due > 0 and max(c.inflight for c in clients.values()) < 20_000:
            stamp = int(time.time() * 1000)
            noise = rng.normal(0, 1, (due, 4))
            batches: dict[str, list] = {}
            for i, k in enumerate(range(published, published + due)):
                node, topic = targets[k % len(targets)]
                seq = k // len(targets)
                batches.setdefault(node, []).append((topic, (DDATA % (
                    stamp, seq, 300 + 2 * noise[i, 0], 310 + noise[i, 1], 1500 + 50 * noise[i, 2], 40 + 5 * noise[i, 3],
                    seq % 200)).encode()))
            for node, messages in batches.items():
                clients[node].publish_many(messages, qos=1)
            published += due
        time.sleep(0.002)
    deadline = time.monotonic() + 60
    while acked[0] < births + published and time.monotonic() < deadline:
        time.sleep(0.01)
    cpu = time.process_time() - cpu0
    for client in clients.values():
        client.stop()
    out.put({"published": published, "acked": acked[0] - births, "cpu_s": cpu})


def _cpu(process) -> float:
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_mode(mode: str, *, rate: float, seconds: float, warmup: float, machines: int, nodes: int, publishers: int,
             workdir: Path, pki) -> dict:
    from tests.services import Mosquitto
    from twin.domain.plant import Plant
    from twin.mqtt.mosquitto_config import MosquittoSecurity, write_mosquitto_security
    from twin.mqtt.security import MQTTSecurity
    from twin.service import TwinConfig, TwinService

    plant = Plant.generated(machines=machines, nodes=nodes)
    node_ids = sorted(plant.nodes)
    logins: dict[str, MQTTSecurity] = {}
    twin_login = None
    security = None
    if mode == "tls+auth":
        security = MosquittoSecurity(out=workdir / "mqtt", certfile=pki.server_cert, keyfile=pki.server_key,
                                     cafile=pki.ca, group=plant.group, nodes=tuple(node_ids), twin_user=TWIN_USER)
        credentials = write_mosquitto_security(security)["credentials"]

        def login(user: str) -> MQTTSecurity:
            return MQTTSecurity(username=user, password=(credentials / f"{user}.password").read_text().strip(),
                                ca=pki.ca)

        logins = {node: login(node) for node in node_ids}
        twin_login = login(TWIN_USER)
    with Mosquitto(workdir=workdir / f"mq-{mode}", persistence=False, security=security) as broker:
        service = TwinService(config=TwinConfig(broker_port=broker.port, db=str(workdir / f"twin-{mode}.db"),
                                                client_id=TWIN_USER, mqtt=twin_login), plant=plant).start()
        service.wait_connected(30)
        ctx = mp.get_context("spawn")
        out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = []
        for k in range(publishers):
            mine = node_ids[k::publishers]
            procs.append(ctx.Process(daemon=True, target=publish_nodes, args=(
                broker.port, plant.group, {n: plant.nodes[n] for n in mine},
                {n: logins[n] for n in mine if n in logins}, rate / publishers, warmup + seconds, k, out, ready, go)))
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=180)
        go.set()
        time.sleep(warmup)
        service.latency_ms.clear()
        service.state_latency_ms.clear()
        committed0, t0, cpu0, broker0 = service.committed, time.monotonic(), time.process_time(), _cpu(broker.process)
        time.sleep(seconds)
        committed1, t1, cpu1, broker1 = service.committed, time.monotonic(), time.process_time(), _cpu(broker.process)
        latency = np.fromiter(service.latency_ms, float)
        state_latency = np.fromiter(service.state_latency_ms, float)
        results = [out.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        acked = sum(r["acked"] for r in results)
        deadline = time.monotonic() + 60
        while service.committed < acked and time.monotonic() < deadline:
            time.sleep(0.05)
        service.store.flush()
        stored = service.store.count("history")
        service.stop()
    ingested = max(1, committed1 - committed0)
    pct = lambda a, q: float(np.percentile(a, q)) if a.size else None  # noqa: E731
    return {"mode": mode, "target_rate": rate, "sustained_rate": (committed1 - committed0) / (t1 - t0),
            "latency_p50_ms": pct(latency, 50), "latency_p99_ms": pct(latency, 99),
            "state_latency_p99_ms": pct(state_latency, 99),
            "published": sum(r["published"] for r in results), "acked_by_broker": acked, "stored": stored,
            "lost": acked - stored,
            "cpu_per_msg_us": {"twin": (cpu1 - cpu0) / ingested * 1e6, "broker": (broker1 - broker0) / ingested * 1e6,
                               "publishers": sum(r["cpu_s"] for r in results) / max(1, acked) * 1e6}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000.0, help="offered msg/s in total")
    add_mqtt_load_arguments(parser, nodes_help="edge nodes: one connection (and login) each")
    parser.add_argument("--repeats", type=int, default=1, help="plaintext, tls+auth pairs, alternated")
    common.add_output_arguments(parser, Path("runs/bench/twin_tls.json"))
    args = parser.parse_args()
    from tests.mqtt_certs import make_pki

    console = Console(stderr=True, width=170)
    measured_on = common.machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="moeworks-bench-twin-tls-") as tmp:
        pki = make_pki(Path(tmp) / "pki")
        for repeat in range(args.repeats):
            for mode in ("plaintext", "tls+auth"):
                console.log(f"{mode}: {args.rate:,.0f} msg/s offered over {args.machines} devices on {args.nodes} "
                            f"nodes for {args.seconds:g} s ...")
                workdir = Path(tmp) / f"{mode.replace('+', '-')}-{repeat}"
                workdir.mkdir()
                runs.append(run_mode(mode, rate=args.rate, seconds=args.seconds, warmup=args.warmup,
                                     machines=args.machines, nodes=args.nodes, publishers=args.publishers,
                                     workdir=workdir, pki=pki))
    rate = {mode: float(np.median([r["sustained_rate"] for r in runs if r["mode"] == mode]))
            for mode in ("plaintext", "tls+auth")}
    ratio = rate["tls+auth"] / rate["plaintext"]
    table = Table(title=f"twin ingestion via Mosquitto, plaintext vs TLS+auth: {common.describe(measured_on)}")
    for col in ("mode", "offered msg/s", "sustained msg/s", "p50 ms", "p99 ms", "state p99 ms", "acked", "stored",
                "lost", "CPU us/msg twin / broker / publishers"):
        table.add_column(col, justify="right")
    for r in runs:
        cpu = r["cpu_per_msg_us"]
        table.add_row(r["mode"], f"{r['target_rate']:,.0f}", f"{r['sustained_rate']:,.0f}",
                      f"{r['latency_p50_ms'] or 0:.0f}", f"{r['latency_p99_ms'] or 0:.0f}",
                      f"{r['state_latency_p99_ms'] or 0:.0f}", f"{r['acked_by_broker']:,}", f"{r['stored']:,}",
                      str(r["lost"]), f"{cpu['twin']:.0f} / {cpu['broker']:.0f} / {cpu['publishers']:.0f}")
    console.print(table)
    console.print(f"TLS+auth / plaintext sustained rate: {ratio:.2f} (target >= 0.80)")
    result = {"benchmark": "twin_ingestion_tls", "machine": measured_on,
              "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "tls_to_plaintext_rate": ratio,
              "target": {"tls_to_plaintext_rate": 0.8, "p99_ms": 250, "offered_rate": 5000, "lost": 0}}
    common.write_results(result, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
