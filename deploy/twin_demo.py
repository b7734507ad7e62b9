"""`moeworks twin demo`: the whole twin on one machine with no set-up.

An in-process MQTT broker (amqtt on 127.0.0.1), SQLite, the twin service with its API and
dashboard, and one edge agent per machine of the demo plant, replaying real data (C-MAPSS
engines, AI4I rows) when the data folder is there, or generated data when it is not.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from twin.domain.plant import Plant
from twin.mqtt.embedded_broker import EmbeddedBroker, free_port
from twin.mqtt.security import MQTTSecurity
from twin.service import TwinConfig, TwinService

# Everything the demo writes in its --out folder, and the record of what it made there: with --force a later
# demo replaces these, and only when the record says a demo made them; nothing else is ever deleted.
DEMO_OUTPUTS = ("twin.db", "twin.db-wal", "twin.db-shm", "work_orders.csv", "twin_summary.json", "edge", "models",
                "mqtt")  # mqtt/: a TLS demo's broker password file and client logins, made for that run
MARKER = ".moeworks-twin-demo.json"


class DemoOutputError(ValueError):
    """The --out folder cannot be used as it is; the message says why and what to do, in one line."""


def prepare_out_dir(out_dir: Path, *, force: bool = False, train_models: bool = True, tls: bool = False,
                    keep: tuple[Path | None, ...] = ()) -> None:
    """Make `out_dir` ready for a demo, or raise DemoOutputError having changed nothing.

    An empty or missing folder is used as it is. A non-empty one needs `force`, and even then only the
    demo's own outputs (DEMO_OUTPUTS) that an earlier demo recorded in MARKER are removed; a file or
    folder of those names that a demo did not make, or one holding a `keep` path (a model folder the
    caller passed in), stops the demo instead.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DemoOutputError(f"--out {out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise DemoOutputError(f"--out {out_dir} is not empty: choose an empty or new folder, or pass --force "
                                  f"to replace an earlier demo's outputs there (nothing else is touched)")
        made = _recorded(out_dir)
        present = [name for name in DEMO_OUTPUTS if (out_dir / name).exists() or (out_dir / name).is_symlink()]
        foreign = [name for name in present if name not in made]
        if foreign:
            raise DemoOutputError(f"--out {out_dir} holds {', '.join(foreign)}, which no demo made there: move "
                                  "it or choose another folder (--force replaces only an earlier demo's outputs)")
        for name in present:
            target = (out_dir / name).resolve()
            for kept in filter(None, keep):
                if Path(kept).resolve() == target or target in Path(kept).resolve().parents:
                    raise DemoOutputError(f"{kept} lies in {out_dir / name}, which --force would replace: "
                                          "copy the model elsewhere first")
        for name in present:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    # recorded before any output exists, so a demo stopped half-way can still be replaced with --force
    made = [name for name in DEMO_OUTPUTS if (name != "models" or train_models) and (name != "mqtt" or tls)]
    (out_dir / MARKER).write_text(json.dumps({"made_by": "moeworks twin demo", "outputs": made}))


def _recorded(out_dir: Path) -> set[str]:
    """The outputs an earlier demo recorded it made in `out_dir` (only names in DEMO_OUTPUTS count)."""
    marker = out_dir / MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 4096:
            return set()
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    outputs = record.get("outputs") if isinstance(record, dict) else None
    return {name for name in outputs if name in DEMO_OUTPUTS} if isinstance(outputs, list) else set()


class HttpServer:
    """uvicorn in a thread on 127.0.0.1."""

    def __init__(self, app, *, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="twin-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def edge_sources(plant: Plant, data_root: Path | None, *, ticks: int | None) -> dict[str, Any]:
    """A source per machine: replays when the data is there, generated machines otherwise."""
    from deploy.edge.sources import AI4IReplay, CmapssReplay, SimulatedEngine, SimulatedMill

    cmapss = data_root / "cmapss" / "train_FD001.txt.gz" if data_root else None
    ai4i = data_root / "ai4i2020" / "ai4i2020.csv.gz" if data_root else None
    sources = {}
    for i, machine in enumerate(plant.machines.values()):
        attrs = machine.attributes
        if machine.kind == "engine":
            if cmapss is not None and cmapss.exists():
                sources[machine.id] = CmapssReplay(cmapss, unit=int(attrs.get("cmapss_unit", i + 1)))
            else:
                sources[machine.id] = SimulatedEngine(seed=i)
        elif ai4i is not None and ai4i.exists():
            sources[machine.id] = AI4IReplay(ai4i, start_row=int(attrs.get("ai4i_start_row", 0)), rows=ticks)
        else:
            sources[machine.id] = SimulatedMill(seed=i, rows=ticks)
    return sources


def demo_models(out_dir: Path, *, quick: bool, console: Console) -> tuple[Path, Path]:
    """A small RUL model and AI4I failure model trained on generated data (seconds), saved in out_dir."""
    import torch

    from manufacturing.maintenance.ai4i import AI4IFailureModel, LightGBMParams, generate_ai4i, split_rows
    from manufacturing.maintenance.quick import train_quick_rul_model

    torch.set_num_threads(1)  # one thread per small model call: more only oversubscribes a 2-core box
    started = time.monotonic()
    rul, ai4i = out_dir / "models" / "rul", out_dir / "models" / "ai4i"
    train_quick_rul_model(rul, num_units=24 if quick else 40, max_epochs=2 if quick else 6)
    train, val = split_rows(generate_ai4i(2000 if quick else 5000, seed=0), seed=0)
    AI4IFailureModel(seed=0, progress=False, max_epochs=3 if quick else 15,
                     lightgbm=LightGBMParams(n_estimators=60 if quick else 300)).fit(train, val_frame=val).save(ai4i)
    console.print(f"trained a RUL model and an AI4I failure model on generated data in "
                  f"{time.monotonic() - started:.0f} s ({out_dir / 'models'})")
    return rul, ai4i


def run_twin_demo(out_dir: Path, *, data_root: Path | None = None, duration_s: float = 60.0, rate_hz: float = 10.0,
                  console: Console | None = None, rul_model: Path | None = None, ai4i_model: Path | None = None,
                  train_models: bool = False, quick: bool = False, force: bool = False,
                  broker_tls: tuple[Path, Path, Path] | None = None) -> dict[str, Any]:
    """Run the demo for `duration_s` (0: until Ctrl-C); returns a summary (also written to twin_summary.json).

    Health comes from the given model folders, from small models trained first (`train_models`),
    or else from the AI4I rules alone (engines then have no RUL). `out_dir` must be empty or new,
    or `force` given (see prepare_out_dir): DemoOutputError otherwise, before anything runs.
    `broker_tls` (certificate, key, CA): the broker speaks TLS with that certificate (it must name
    127.0.0.1) and lets in only the twin and the edge nodes, each with a password of its own made
    for this run; every client checks the broker against the CA.
    """
    from deploy.edge.agent import EdgeAgent, EdgeConfig
    from twin.api.app import create_app

    console = console or Console()
    out_dir = Path(out_dir)
    train_models = train_models and rul_model is None and ai4i_model is None
    prepare_out_dir(out_dir, force=force, train_models=train_models, tls=broker_tls is not None,
                    keep=(rul_model, ai4i_model))
    if train_models:
        rul_model, ai4i_model = demo_models(out_dir, quick=quick, console=console)
    plant = Plant.from_yaml()
    sources = edge_sources(plant, data_root, ticks=None)
    generated = [m for m, s in sources.items() if "generated" in s.description]
    started = time.monotonic()
    logins = _demo_logins(plant, out_dir / "mqtt", ca=broker_tls[2]) if broker_tls else {}
    tls = {"password_file": out_dir / "mqtt" / "broker_passwd", "certfile": broker_tls[0],
           "keyfile": broker_tls[1]} if broker_tls else {}
    with EmbeddedBroker(**tls) as broker:
        service = TwinService(config=TwinConfig(broker_port=broker.port, db=str(out_dir / "twin.db"),
                                                mqtt=logins.get("moeworks-twin"),
                                                work_orders_csv=str(out_dir / "work_orders.csv"),
                                                rul_model=str(rul_model) if rul_model else None,
                                                ai4i_model=str(ai4i_model) if ai4i_model else None),
                              plant=plant).start()
        http = HttpServer(create_app(service)).start()
        try:
            service.wait_connected()
            console.print(f"[bold]twin dashboard: {http.url}[/]  (API docs {http.url}docs, broker 127.0.0.1:"
                          f"{broker.port})")
            console.print("data: " + ("generated (no data folder found)" if len(generated) == len(sources) else
                                      f"real replays; generated for {', '.join(generated)}" if generated else
                                      "real replays (C-MAPSS FD001, AI4I 2020)"))
            stop = threading.Event()
            agents = [EdgeAgent(config=EdgeConfig(port=broker.port, group=plant.group, node=m.node, device=m.id,
                                                  rate_hz=rate_hz, spool=out_dir / "edge" / f"{m.node}.spool",
                                                  keepalive_s=5, security=logins.get(m.node),
                                                  primary_host=service.config.client_id),  # Sparkplug STATE
                                source=sources[m.id])
                      for m in plant.machines.values()]
            threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
            for thread in threads:
                thread.start()
            try:
                if duration_s > 0:
                    stop.wait(duration_s)
                else:
                    console.print("serving until Ctrl-C")
                    while not stop.wait(1.0):
                        pass
            except KeyboardInterrupt:
                pass
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            time.sleep(0.3)  # the death certificates travel through the broker
            service.store.flush()
            summary = _summary(service, agents, time.monotonic() - started, generated)
        finally:
            http.stop()
            service.stop()
    (out_dir / "twin_summary.json").write_text(json.dumps(summary, indent=2))
    _print(console, summary)
    return summary


def _demo_logins(plant: Plant, folder: Path, *, ca: Path) -> dict[str, MQTTSecurity]:
    """A fresh random password for the twin and for each edge node, hashed into the broker's password
    file; the passwords themselves stay in memory, for this run's clients."""
    import secrets

    from twin.mqtt.broker_passwd import set_password

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broker_passwd").unlink(missing_ok=True)  # last run's users go with their passwords
    logins = {}
    for user in ("moeworks-twin", *sorted(plant.nodes)):
        password = secrets.token_urlsafe(24)
        set_password(folder / "broker_passwd", user, password)
        logins[user] = MQTTSecurity(username=user, password=password, ca=ca)
    return logins


def _summary(service: TwinService, agents, elapsed: float, generated: list[str]) -> dict[str, Any]:
    stats = service.stats()
    return {"seconds": round(elapsed, 1), "generated_data_for": generated, "stats": stats,
            "agents": {a.config.device: a.stats for a in agents},
            "history_rows": service.store.count("history"), "dead_letters": service.store.count("dead_letters"),
            "alarms": service.store.count("alarms"), "work_orders": service.store.count("work_orders"),
            "assets": [{"id": a["id"], "online": a["online"], "messages": a["messages"], "last_seq": a["last_seq"],
                        "health": a["health"], "active_alarms": a["active_alarms"]} for a in service.assets()]}


def _print(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title="digital twin demo")
    for column in ("asset", "messages", "health", "alarms open"):
        table.add_column(column)
    for a in summary["assets"]:
        h = a["health"] or {}
        health = (f"RUL {h['rul']:.0f}" if h.get("rul") is not None else
                  f"P(fail) {h['failure_prob']:.3f} ({h['mode']})" if h.get("failure_prob") is not None else "-")
        table.add_row(a["id"], str(a["messages"]), health, str(a["active_alarms"]))
    console.print(table)
    s = summary["stats"]
    console.print(f"history rows {summary['history_rows']}, alarms {summary['alarms']}, work orders "
                  f"{summary['work_orders']}, dead letters {summary['dead_letters']}; publish->history p99 "
                  f"{s['latency_ms']['p99'] or 0:.0f} ms; {summary['seconds']} s")
