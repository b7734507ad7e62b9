"""The twin service: subscribes to the plant's Sparkplug namespace and keeps state, health,
alarms, history and work orders up to date as messages arrive.

Threads: the MQTT client's network thread (twin.mqtt_burst) ingests each burst of received
messages (state + alarms under one lock, taken once per burst, so each message is applied
atomically) and acknowledges them to the broker once applied; the history writer commits in
batches; a ticker ages data into staleness; the MES exporter posts work orders. The REST API and
dashboard read snapshots under the same lock.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twin.alarms import MAINTENANCE_KINDS, Alarm, AlarmManager
from twin.health import HealthModel
from twin.mes import MESConfig, WorkOrderExporter
from twin.mqtt_burst import BurstClient, BurstClientConfig
from twin.payload import NAMESPACE, REBIRTH, Metric, Payload, Topic
from twin.plant import DEFAULT_PLANT, Plant
from twin.simulate import EnginePlan, FailureModel, MillPlan, SimulationError, simulate_engine, simulate_mill
from twin.state import Ingested, TwinState
from twin.store import HistoryStore, WriterConfig


@dataclass(frozen=True)
class TwinConfig:
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    client_id: str = "moeworks-twin"      # fixed, with a persistent session: the broker queues for us while we restart
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


class TwinService:
    def __init__(self, *, config: TwinConfig, plant: Plant | None = None,
                 health_models: dict[str, HealthModel] | None = None, failure_model: FailureModel | None = None):
        self.config = config
        self.plant = plant or Plant.from_yaml(config.plant)
        if health_models is None:
            from twin.models import learned_health_models

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
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.client: BurstClient | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> TwinService:
        cfg = self.config
        self.store = HistoryStore(cfg.db, writer=WriterConfig(cfg.batch_rows, cfg.flush_interval_s),
                                  on_commit=self._on_commit).start()
        self.state = TwinState(plant=self.plant, health_models=self.health_models, seen=self.store.has,
                               last_seqs=self.store.last_seqs())
        self.alarms = AlarmManager()
        self.alarms.load(self.store.open_alarms())
        self._warm_health()
        self.mes = WorkOrderExporter(config=MESConfig(cfg.mes_url, Path(cfg.work_orders_csv)
                                                      if cfg.work_orders_csv else None), store=self.store).start()
        state_topic = f"{NAMESPACE}/STATE/{cfg.client_id}"
        self.client = BurstClient(
            config=BurstClientConfig(host=cfg.broker_host, port=cfg.broker_port, client_id=cfg.client_id,
                                     clean_session=False, keepalive_s=cfg.keepalive_s,
                                     will=(state_topic, b'{"online":false}', 1, True),
                                     backoff_min_s=0.1, backoff_max_s=5.0),
            subscriptions=((f"{NAMESPACE}/{self.plant.group}/#", 1),),
            on_messages=self._on_messages, on_connect=self._on_connect,
            on_disconnect=lambda client: self.connected.clear()).start()
        ticker = threading.Thread(target=self._tick_loop, name="twin-ticker", daemon=True)
        ticker.start()
        self._threads.append(ticker)
        if cfg.freeze_gc:
            gc.collect()  # nothing collectable is frozen with the rest
            gc.freeze()   # refcounting still frees these objects; only the cycle scans skip them
        return self

    def _warm_health(self) -> None:
        """Health models with a memory (the RUL windows) get each device's in-order history back: the
        last window's worth, or the whole stored life for features that read it (`history_needed`)."""
        for device in self.state.devices.values():
            model = self.health_models.get(device.machine.kind)
            if device.last_seq < 0 or not hasattr(model, "warm"):
                continue
            rows = [r for r in self.store.history(device.machine.id, latest=True, limit=model.history_needed)
                    if r["in_order"]]
            if rows:
                device.values.update(rows[-1]["values"])
                device.health = model.warm(device.machine, [r["values"] for r in rows])

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self.connected.wait(timeout):
            raise ConnectionError(f"twin could not reach the MQTT broker at "
                                  f"{self.config.broker_host}:{self.config.broker_port} within {timeout} s")

    def stop(self) -> None:
        self._stop.set()
        if self.client is not None:
            self.client.publish(f"{NAMESPACE}/STATE/{self.config.client_id}", b'{"online":false}', qos=1, retain=True)
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
    def _on_connect(self, client: BurstClient, session_present: bool) -> None:
        client.publish(f"{NAMESPACE}/STATE/{self.config.client_id}", b'{"online":true}', qos=1, retain=True)
        self.connected.set()

    def _on_messages(self, messages: list[tuple[str, bytes]]) -> None:
        self.ingest_many(messages)

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
            if dead:
                self.store.put_dead_letters(dead)
            if rows:
                self.store.put_history_many(rows)
            if changed_any:
                self.version += 1
        if rebirths and self.client is not None:
            payload = Payload(now_ms, metrics=[Metric(REBIRTH, True, "Boolean")]).to_json()
            self.client.publish_many([(str(Topic(self.plant.group, "NCMD", node)), payload) for node in rebirths],
                                     qos=1)

    def _alarm_changes(self, changed: list[Alarm], now_ms: int) -> None:
        for alarm in changed:
            self.store.put_alarm(alarm)
            if alarm.kind in MAINTENANCE_KINDS and alarm.raised_ms == now_ms and alarm.cleared_ms is None:
                self.mes.order_for(alarm, line=self.plant.machines[alarm.device].line, now_ms=now_ms)

    def _on_commit(self, items: list[Ingested], committed_s: float) -> None:
        now_ms = committed_s * 1000.0
        self.latency_ms.extend(now_ms - item.timestamp for item in items)
        self.committed += len(items)

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
                           "metrics": dict(self.state.nodes[device.machine.node].metrics)}
            return row

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
        return {"counters": counters, "devices": len(self.plant.machines), "online": online,
                "committed": self.committed, "rows_written": self.store.rows_written, "batches": self.store.batches,
                "write_errors": self.store.write_errors, "mqtt_connected": self.connected.is_set(),
                "work_orders_pending": self.mes.pending, "work_orders_delivered": self.mes.delivered,
                "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat.size else None,
                               "p99": float(np.percentile(lat, 99)) if lat.size else None}}
