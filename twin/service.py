"""The twin service: subscribes to the plant's Sparkplug namespace and keeps state, health,
alarms, history and work orders up to date as messages arrive.

Threads: the MQTT client's network thread (twin.mqtt.burst_client) ingests each burst of received
messages (state + alarms under one lock, taken once per burst, so each message is applied
atomically) and hands their rows to the history writer; the writer commits in batches and only
then sends the burst's PUBACKs, so what the broker was told is received is on disk (a twin killed
before that gets the messages again from its persistent session, and the history key drops the
copies). Learned health models (milliseconds a call) run on their own thread, fed through a bounded
queue, so they never hold up ingestion or the acknowledgements; a ticker ages data into
staleness; the MES exporter posts work orders. The REST API and dashboard read snapshots under the
same lock.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twin.domain.alarms import MAINTENANCE_KINDS, Alarm, AlarmManager
from twin.domain.health import HealthModel
from twin.domain.plant import DEFAULT_PLANT, Plant
from twin.domain.state import Ingested, TwinState
from twin.domain.whatif import EnginePlan, FailureModel, MillPlan, SimulationError, simulate_engine, simulate_mill
from twin.mqtt.burst_client import BurstClient, BurstClientConfig
from twin.mqtt.security import MQTTSecurity
from twin.sparkplug.codec import DEFAULT_CODEC, check_codec, encode
from twin.sparkplug.payload import MAX_PAYLOAD_BYTES, NAMESPACE, REBIRTH, Limits, Metric, Payload, Topic
from twin.store.history import Bulk, HistoryStore, WriterConfig
from twin.store.mes import MESConfig, WorkOrderExporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TwinConfig:
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    client_id: str = "moeworks-twin"      # fixed, with a persistent session: the broker queues for us while we restart
    mqtt: MQTTSecurity | None = None       # username/password and TLS towards the broker (twin.mqtt.security)
    db: str = "runs/twin/twin.db"          # SQLite file, or a postgresql:// URL
    plant: str = str(DEFAULT_PLANT)
    keepalive_s: int = 10                  # the broker notices a dead twin within 1.5x this
    tick_s: float = 0.5                    # staleness check period: half the finest stale_after_s we expect
    batch_rows: int = 2_000
    flush_interval_s: float = 0.05
    mes_url: str | None = None
    work_orders_csv: str | None = None
    rul_model: str | None = None           # folder from `moeworks maintenance train`: RUL of engines
    ai4i_model: str | None = None          # folder from `moeworks maintenance ai4i-train`: mill failure risk
    latency_window: int = 200_000          # latencies kept for p50/p99 (a few seconds at full rate)
    freeze_gc: bool = True                 # after start-up, move what exists (modules, plant, state) out of the
                                           # cyclic GC's reach: its full collections hold the GIL and, scanning
                                           # all that, stalled ingestion for 70-300 ms (benchmarks/RESULTS.md)
    max_payload_bytes: int = MAX_PAYLOAD_BYTES  # larger messages are dead-lettered (an excerpt is kept)
    max_timestamp_age_s: float = 30 * 86_400.0  # edge timestamps older than this (by the twin's clock)...
    max_timestamp_ahead_s: float = 300.0        # ...or further ahead are refused: a broken clock, or an attack
    health_queue: int = 10_000             # learned-model scorings waiting; when full, new ones are dropped, counted
    payload: str = DEFAULT_CODEC           # what the twin sends (rebirth NCMDs): "protobuf" or "json"; it reads both

    def __post_init__(self):
        for name in ("keepalive_s", "batch_rows", "latency_window", "max_payload_bytes", "health_queue"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"TwinConfig.{name} must be a positive integer, got {value!r}")
        for name in ("tick_s", "flush_interval_s", "max_timestamp_age_s", "max_timestamp_ahead_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < 10 * 365 * 86_400:
                raise ValueError(f"TwinConfig.{name} must be a positive number of seconds, got {value!r}")
        check_codec(self.payload, "TwinConfig")
        if not 0 < self.broker_port < 65_536:
            raise ValueError(f"TwinConfig.broker_port must be 1..65535, got {self.broker_port!r}")

    @property
    def limits(self) -> Limits:
        return Limits(max_payload_bytes=self.max_payload_bytes, max_age_ms=int(self.max_timestamp_age_s * 1000),
                      max_ahead_ms=int(self.max_timestamp_ahead_s * 1000))


class TwinService:
    store_statements: dict[str, str] = {}  # more row kinds for the history writer (twin/scaleout/worker.py's inbox)
    store_bulk: dict[str, Bulk] = {}      # ...and those PostgreSQL takes by COPY (twin.store.history.PG_BULK)

    def __init__(self, *, config: TwinConfig, plant: Plant | None = None,
                 health_models: dict[str, HealthModel] | None = None, failure_model: FailureModel | None = None):
        self.config = config
        self.plant = plant or Plant.from_yaml(config.plant)
        if health_models is None:
            from twin.domain.learned_health import learned_health_models

            health_models, learned_hazard = learned_health_models(rul_model=config.rul_model,
                                                                  ai4i_model=config.ai4i_model)
            failure_model = failure_model or learned_hazard
        self.health_models = health_models
        self.failure_model = failure_model
        self._lock = threading.RLock()
        self.version = 0                            # bumps on every state change: the dashboard's cue
        self.latency_ms: deque[float] = deque(maxlen=config.latency_window)       # publish -> history committed
        self.state_latency_ms: deque[float] = deque(maxlen=config.latency_window)  # publish -> state updated
        self.committed = 0
        self._health_jobs: queue.Queue = queue.Queue(maxsize=config.health_queue)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.client: BurstClient | None = None
        self._state_topic = f"{NAMESPACE}/STATE/{config.client_id}"
        self._state_timestamp = 0  # Sparkplug 3.0: the will's STATE carries the timestamp of our online ones

    # ------------------------------------------------------------------ life cycle
    def start(self) -> TwinService:
        cfg = self.config
        self.store = HistoryStore(cfg.db, writer=WriterConfig(cfg.batch_rows, cfg.flush_interval_s),
                                  on_commit=self._on_commit, statements=self.store_statements,
                                  bulk=self.store_bulk).start()
        self.state = TwinState(plant=self.plant, health_models=self.health_models, seen=self.store.has,
                               last_seqs=self.store.last_seqs(), limits=cfg.limits, defer_health=True)
        self.alarms = AlarmManager()
        self.alarms.load(self.store.open_alarms())
        self._warm_health()
        self.mes = WorkOrderExporter(config=MESConfig(cfg.mes_url, Path(cfg.work_orders_csv)
                                                      if cfg.work_orders_csv else None), store=self.store).start()
        self._state_timestamp = int(time.time() * 1000)
        self._start_mqtt()
        for target, name in ((self._tick_loop, "twin-ticker"), (self._health_loop, "twin-health")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if cfg.freeze_gc:
            gc.collect()  # nothing collectable is frozen with the rest
            gc.freeze()   # refcounting still frees these objects; only the cycle scans skip them
        return self

    def _start_mqtt(self) -> None:
        """One MQTT session, the plant's whole namespace (twin/scaleout/worker.py: one per worker slot, shared)."""
        cfg = self.config
        self.client = BurstClient(
            config=BurstClientConfig(host=cfg.broker_host, port=cfg.broker_port, client_id=cfg.client_id,
                                     clean_session=False, keepalive_s=cfg.keepalive_s,
                                     will=(self._state_topic, self._host_state(False), 1, True),
                                     backoff_min_s=0.1, backoff_max_s=5.0, security=cfg.mqtt),
            subscriptions=((f"{NAMESPACE}/{self.plant.group}/#", 1),),
            on_messages=self._on_messages, defer_acks=True, on_connect=self._on_connect,
            on_disconnect=lambda client: self.connected.clear()).start()

    def _warm_health(self) -> None:
        """Health models with a memory (the RUL windows) get each device's in-order history back: the
        last window's worth, or the whole stored life for features that read it (`history_needed`)."""
        for device in self.state.devices.values():
            self._warm_device(device)

    def _warm_device(self, device) -> None:
        model = self.health_models.get(device.machine.kind)
        if device.last_seq < 0 or not hasattr(model, "warm"):
            return
        rows = [r for r in self.store.history(device.machine.id, latest=True, limit=model.history_needed)
                if r["in_order"]]
        if rows:
            device.values.update(rows[-1]["values"])
            device.health = model.warm(device.machine, [r["values"] for r in rows])

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self.connected.wait(timeout):
            last_error = self.client.last_error if self.client is not None else None
            raise ConnectionError(f"twin could not reach the MQTT broker at "
                                  f"{self.config.broker_host}:{self.config.broker_port} within {timeout} s"
                                  + (f" ({last_error})" if last_error else ""))

    def stop(self) -> None:
        self._stop.set()
        if self.client is not None:
            self.client.publish(self._state_topic, self._host_state(False), qos=1, retain=True)
            self.client.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self.mes.stop()
        self.store.close()

    def __enter__(self) -> TwinService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ MQTT
    def _host_state(self, online: bool) -> bytes:
        """The primary host application's STATE (Sparkplug 3.0, retained): edge nodes following it hold their
        data while it says offline; one timestamp per start, so an edge can tell a stale will from a new one."""
        return b'{"online":%s,"timestamp":%d}' % (b"true" if online else b"false", self._state_timestamp)

    def _on_connect(self, client: BurstClient, session_present: bool) -> None:
        client.publish(self._state_topic, self._host_state(True), qos=1, retain=True)
        self.connected.set()

    def _on_messages(self, messages: list[tuple[str, bytes]], ack) -> None:
        self.ingest_many(messages)  # if this raised (a bug), no PUBACK: the broker sends them again after a reconnect
        self.store.put_ack(ack)     # the PUBACKs leave once the writer has committed everything queued before

    def ingest(self, topic: str, raw: bytes) -> None:
        """Apply one message: state, alarms, history, dead letters. Never raises on bad input."""
        self.ingest_many([(topic, raw)])

    def ingest_many(self, messages: list[tuple[str, bytes]]) -> None:
        """Apply a burst of messages in arrival order, each as `ingest` would, under one lock and with
        one hand-over of their history rows to the writer. Never raises on bad input."""
        now_ms = int(time.time() * 1000)
        rebirths: list[str] = []
        rows: list[Ingested] = []
        dead: list[tuple[str, bytes, str, int]] = []
        with self._lock:
            state, alarms, devices = self.state, self.alarms, self.state.devices
            changed_any = False
            for topic, raw in messages:
                try:
                    outcome = state.apply(topic, raw, now_ms)
                except Exception as exc:  # noqa: BLE001 - a bug must cost one message (dead-lettered), not the twin
                    state.counters["dead_letter"] += 1
                    state.counters["internal_error"] += 1
                    dead.append((topic, bytes(raw), f"internal error: {type(exc).__name__}: {exc}", now_ms))
                    continue
                for reason in outcome.dead_letters:
                    dead.append((topic, bytes(raw), reason, now_ms))
                item = outcome.ingested
                if item is not None:
                    rows.append(item)
                    self.state_latency_ms.append(now_ms - item.timestamp)
                for device in outcome.changed:
                    changes = alarms.evaluate(devices[device], now_ms)
                    if changes:
                        self._alarm_changes(changes, now_ms)
                    changed_any = True
                if outcome.rebirth:
                    rebirths.append(outcome.rebirth)
                if outcome.health_job is not None:
                    try:
                        self._health_jobs.put_nowait(outcome.health_job)
                    except queue.Full:  # the models fell behind: skip this scoring rather than hold ingestion
                        state.counters["health_dropped"] += 1
            if dead:
                self.store.put_dead_letters(dead)
            if rows:
                self.store.put_history_many(rows)
            if changed_any:
                self.version += 1
        if rebirths and self.client is not None:
            payload = encode(Payload(now_ms, metrics=[Metric(REBIRTH, True, "Boolean")]), self.config.payload)
            self.client.publish_many([(str(Topic(self.plant.group, "NCMD", node)), payload) for node in rebirths],
                                     qos=1)

    def _alarm_changes(self, changed: list[Alarm], now_ms: int) -> None:
        for alarm in changed:
            self._put_alarm(alarm)
            if alarm.kind in MAINTENANCE_KINDS and alarm.raised_ms == now_ms and alarm.cleared_ms is None:
                self.mes.order_for(alarm, line=self.plant.machines[alarm.device].line, now_ms=now_ms)

    def _put_alarm(self, alarm: Alarm) -> None:
        self.store.put_alarm(alarm)  # twin/scaleout/worker.py writes it only while it owns the device

    def _on_commit(self, items: list[Ingested], committed_s: float) -> None:
        now_ms = committed_s * 1000.0
        self.latency_ms.extend(now_ms - item.timestamp for item in items)
        self.committed += len(items)

    def _health_loop(self) -> None:
        """Learned health models, off the ingestion path: one job per in-order data message, in order."""
        jobs = self._health_jobs
        while not self._stop.is_set():
            try:
                device_id, values = jobs.get(timeout=0.25)
            except queue.Empty:
                continue
            try:
                self._score(device_id, values)
            except Exception:  # noqa: BLE001 - a model's failure costs that scoring, not the twin
                log.exception("health model failed on %s", device_id)
                with self._lock:
                    self.state.counters["health_error"] += 1
            finally:
                jobs.task_done()

    def _score(self, device_id: str, values: dict[str, Any]) -> None:
        device = self.state.devices[device_id]
        health = self.health_models[device.machine.kind].update(device.machine, values)
        if health is None:
            return
        now_ms = int(time.time() * 1000)
        with self._lock:
            device.health = health
            changes = self.alarms.evaluate(device, now_ms)
            if changes:
                self._alarm_changes(changes, now_ms)
            self.version += 1

    def wait_health(self, timeout: float = 30.0) -> None:
        """Block until every health scoring queued so far is done (tests, the demo's summary)."""
        deadline = time.monotonic() + timeout
        while self._health_jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            now_ms = int(time.time() * 1000)
            with self._lock:
                changed = self.state.tick(now_ms)
                for device in changed:
                    self._alarm_changes(self.alarms.evaluate(self.state.devices[device], now_ms), now_ms)
                if changed:
                    self.version += 1

    # ------------------------------------------------------------------ queries
    def assets(self) -> list[dict[str, Any]]:
        with self._lock:
            open_by_device: dict[str, int] = {}
            for device, alarms in self.alarms.open.items():
                open_by_device[device] = sum(a.cleared_ms is None for a in alarms.values())
            out = []
            for device in self.state.devices.values():
                row = device.to_dict()
                row["values"] = dict(row["values"])
                row["active_alarms"] = open_by_device.get(device.machine.id, 0)
                row["node_online"] = self.state.nodes[device.machine.node].online
                out.append(row)
            return out

    def asset(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            device = self.state.devices.get(device_id)
            if device is None:
                return None
            row = device.to_dict()
            row["values"] = dict(row["values"])
            row["sensors"] = [vars(s) for s in device.machine.sensors.values()]
            row["node"] = {"id": device.machine.node, "online": self.state.nodes[device.machine.node].online,
                           "bd_seq": self.state.nodes[device.machine.node].bd_seq,
                           "stale": self.state.nodes[device.machine.node].stale,
                           "metrics": dict(self.state.nodes[device.machine.node].metrics)}
            return row

    def node_metrics(self, node: str) -> dict[str, Any]:
        """A copy of an edge node's metrics from its NBIRTH and NDATA (model rollouts read their reports
        here), with `_online`; empty for an unknown node."""
        with self._lock:
            state = self.state.nodes.get(node)
            return {} if state is None else dict(state.metrics, _online=state.online)

    def nodes_metrics(self, nodes: list[str]) -> dict[str, dict[str, Any]]:
        """node_metrics of several nodes (a scaled-out worker reads them in one query)."""
        return {node: self.node_metrics(node) for node in nodes}

    def enable_rollouts(self) -> None:
        """A rollout manager runs on this service (a scaled-out worker may then take the rollout lease)."""

    def rollout_fence(self) -> tuple[str, str, int] | None | bool:
        """Whether this process moves model rollouts on: a single twin always does, unfenced (None). A scaled-out
        worker answers False unless it holds the rollout lease, then (key, worker, epoch) to fence its writes."""
        return None

    def acknowledge(self, alarm_id: str, user: str, role: str | None = None) -> Alarm | None:
        now_ms = int(time.time() * 1000)
        with self._lock:
            alarm = self.alarms.acknowledge(alarm_id, user=user, role=role, now_ms=now_ms)
            if alarm is not None:
                self.store.put_alarm(alarm)
                self.version += 1
            return alarm

    def open_alarms(self) -> list[Alarm]:
        with self._lock:
            return [Alarm(**vars(a)) for a in self.alarms.all_open()]

    def simulate(self, device_id: str, plan: MillPlan | EnginePlan) -> dict[str, Any]:
        with self._lock:
            device = self.state.devices.get(device_id)
            if device is None:
                raise SimulationError(f"unknown asset {device_id!r}")
            values, health, kind = dict(device.values), device.health, device.machine.kind
        if kind == "mill":
            if not isinstance(plan, MillPlan):
                raise SimulationError(f"{device_id} is a mill: give a mill plan")
            return simulate_mill(values, plan, model=self.failure_model)
        if kind == "engine":
            if not isinstance(plan, EnginePlan):
                raise SimulationError(f"{device_id} is an engine: give an engine plan")
            return simulate_engine(health.rul if health else None, health.rul_sd if health else None, plan)
        raise SimulationError(f"no simulation for machines of kind {kind!r}")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counters = dict(self.state.counters)
            online = sum(d.online for d in self.state.devices.values())
        lat = np.fromiter(self.latency_ms, float) if self.latency_ms else np.zeros(0)
        state_lat = np.fromiter(self.state_latency_ms, float) if self.state_latency_ms else np.zeros(0)
        return {"counters": counters, "devices": len(self.plant.machines), "online": online,
                "committed": self.committed, "rows_written": self.store.rows_written, "batches": self.store.batches,
                "write_errors": self.store.write_errors, "rows_refused": self.store.rows_refused,
                "health_backlog": self._health_jobs.qsize(), "mqtt_connected": self.connected.is_set(),
                "work_orders_pending": self.mes.pending, "work_orders_delivered": self.mes.delivered,
                "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat.size else None,
                               "p99": float(np.percentile(lat, 99)) if lat.size else None},
                "state_latency_ms": {"p50": float(np.percentile(state_lat, 50)) if state_lat.size else None,
                                     "p99": float(np.percentile(state_lat, 99)) if state_lat.size else None}}


def main(argv: list[str] | None = None) -> None:
    """`python -m twin.service CONFIG.json`: the ingestion service alone, without the HTTP API, until
    SIGTERM or SIGINT. CONFIG holds TwinConfig fields and optionally `plant` (a plant document) or
    `generated_plant` (the arguments of Plant.generated). The
    fault-injection tests and `benchmarks/twin.py --kill-cycles` run the twin this way, as its own
    process, so they can SIGKILL it mid-stream."""
    import json
    import signal
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m twin.service CONFIG.json", file=sys.stderr)
        raise SystemExit(2)
    try:
        doc = json.loads(Path(args[0]).read_text())
        plant = Plant.from_dict(doc.pop("plant")) if "plant" in doc else None
        if "generated_plant" in doc:  # {"machines": N, "nodes": M}: the benchmark's plant
            plant = Plant.generated(**doc.pop("generated_plant"))
        service = TwinService(config=TwinConfig(**doc), plant=plant).start()
        service.wait_connected(30)
    except (OSError, ValueError, TypeError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    service.stop()


if __name__ == "__main__":
    main()
