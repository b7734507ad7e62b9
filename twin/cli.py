"""`moeworks twin ...`: the digital twin service."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import typer

app = typer.Typer(help="Digital twin of factory assets fed over MQTT.", no_args_is_help=True)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


def _data_root(data: Path | None) -> Path | None:
    if data is not None:
        return data
    value = os.environ.get("MOEWORKS_DATA")
    return Path(value) if value and Path(value).is_dir() else None


@app.command()
def serve(plant: Path | None = typer.Option(None, help="plant file (YAML); default: the demo plant"),
          db: str = typer.Option("runs/twin/twin.db", help="SQLite file or postgresql://user@host:port/db URL"),
          broker_host: str = typer.Option("127.0.0.1"), broker_port: int = typer.Option(1883),
          http_host: str = typer.Option("127.0.0.1"), http_port: int = typer.Option(8000),
          mes_url: str | None = typer.Option(None, help="POST work orders here (retried until accepted)"),
          rul_model: Path | None = typer.Option(None, help="RUL model folder (`moeworks maintenance train`)"),
          ai4i_model: Path | None = typer.Option(None, help="AI4I model folder (`moeworks maintenance ai4i-train`)"),
          work_orders_csv: Path | None = typer.Option(Path("runs/twin/work_orders.csv")),
          auth_file: Path | None = typer.Option(None, help="bearer tokens with roles (`moeworks auth token`); "
                                                           "without it the twin serves loopback only")) -> None:
    """Run the twin: subscribe to the plant's namespace, serve the API and the dashboard until Ctrl-C."""
    import torch
    import uvicorn

    from twin.api import create_app
    from twin.auth import AuthError, TokenStore, check_bind
    from twin.plant import DEFAULT_PLANT, Plant, PlantConfigError
    from twin.service import TwinConfig, TwinService
    from twin.store import StoreError

    try:  # before anything starts: a refused bind must not leave a twin subscribed to the broker
        check_bind(http_host, auth_file)
        tokens = TokenStore.load(auth_file) if auth_file is not None else None
    except AuthError as exc:
        _fail(exc)

    torch.set_num_threads(1)  # the twin scores one row at a time: more threads only contend on small machines
    try:
        model = Plant.from_yaml(plant or DEFAULT_PLANT)
        config = TwinConfig(broker_host=broker_host, broker_port=broker_port, db=db, mes_url=mes_url,
                            work_orders_csv=str(work_orders_csv) if work_orders_csv else None,
                            rul_model=str(rul_model) if rul_model else None,
                            ai4i_model=str(ai4i_model) if ai4i_model else None)
        service = TwinService(config=config, plant=model).start()
    except (PlantConfigError, StoreError, ValueError) as exc:  # ValueError: the maintenance models' data errors
        _fail(exc)
    typer.echo(f"twin: {len(model.machines)} assets of {model.site}; broker {broker_host}:{broker_port}; "
               f"dashboard http://{http_host}:{http_port}/", err=True)
    try:
        uvicorn.run(create_app(service, tokens=tokens), host=http_host, port=http_port, log_level="warning")
    finally:
        service.stop()


@app.command()
def demo(out: Path = typer.Option(Path("runs/twin-demo"), help="folder for the database, spools and summary"),
         duration: float = typer.Option(60.0, help="seconds to run; 0 runs until Ctrl-C"),
         rate: float = typer.Option(10.0, help="ticks per second per machine"),
         data: Path | None = typer.Option(None, help="data folder (like ../shared/data); generated data without"),
         quick: bool = typer.Option(False, help="a few seconds at a high rate (for tests)"),
         rul_model: Path | None = typer.Option(None, help="RUL model folder (`moeworks maintenance train`)"),
         ai4i_model: Path | None = typer.Option(None, help="AI4I model folder (`moeworks maintenance ai4i-train`)"),
         train_models: bool = typer.Option(True, help="train small health models on generated data first "
                                                      "(when no model folders are given)"),
         as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on the last line"),
         force: bool = typer.Option(False, "--force", help="use a non-empty --out: replaces what an earlier demo "
                                                           "made there, never anything else")) -> None:
    """Broker, edge agents, twin and dashboard on this machine, no set-up; prints the dashboard's address."""
    import torch

    from twin.demo import DemoOutputError, run_twin_demo

    torch.set_num_threads(1)  # the twin scores one row at a time: more threads only contend on small machines
    try:
        summary = run_twin_demo(out, data_root=_data_root(data), duration_s=5.0 if quick else duration,
                                rate_hz=20.0 if quick else rate, rul_model=rul_model, ai4i_model=ai4i_model,
                                train_models=train_models, quick=quick, force=force)
    except DemoOutputError as exc:  # raised before anything starts or is deleted
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(summary))


@app.command()
def etl(db: str = typer.Option("runs/twin/twin.db", help="SQLite file or postgresql:// URL of the twin's history"),
        out: Path = typer.Option(Path("runs/twin/daily"), help="folder for <YYYY-MM-DD>.parquet"),
        day: list[str] = typer.Option(None, help="UTC day(s) to (re)build; default: every day in the history")) -> None:
    """Aggregate the history into one Parquet file per UTC day (per device and metric)."""
    from twin.etl import run_etl
    from twin.store import HistoryStore, StoreError

    try:
        store = HistoryStore(db)
        files = run_etl(store, out, days=day or None)
    except (StoreError, ValueError) as exc:
        _fail(exc)
    store.close()
    for path in files:
        typer.echo(str(path))
    typer.echo(f"{len(files)} daily file(s) in {out}", err=True)


@app.command()
def broker(port: int = typer.Option(1883, help="loopback port")) -> None:
    """An in-process MQTT broker (amqtt) on 127.0.0.1 for trying the edge and the twin without Mosquitto."""
    from twin.services import EmbeddedBroker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedBroker(port=port):
        typer.echo(f"MQTT broker on 127.0.0.1:{port}; Ctrl-C stops it", err=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
