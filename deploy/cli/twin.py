"""`moeworks twin ...`: the digital twin service."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import typer

from deploy.cli import output
from deploy.cli.errors import UserInputError
from deploy.cli.rollout import app as rollout_app
from twin.mqtt import cli_options as mqtt

app = typer.Typer(help="Digital twin of factory assets fed over MQTT.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
JSON = typer.Option(False, "--json", help="print the result as one JSON object on stdout")


def _fail(exc: Exception | str) -> None:
    """A refusal found while setting up (the one exit for it is deploy/cli/main.py)."""
    raise UserInputError(str(exc))


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
          mqtt_username: mqtt.Username = None, mqtt_password_file: mqtt.PasswordFile = None,
          mqtt_tls: mqtt.Tls = False, mqtt_ca: mqtt.Ca = None, mqtt_cert: mqtt.Cert = None,
          mqtt_key: mqtt.Key = None,
          payload: str = typer.Option("protobuf", help="protobuf (Sparkplug B) | json: what the twin sends; "
                                                      "it reads both"),
          auth_file: Path | None = typer.Option(None, help="bearer tokens with roles (`moeworks auth token`); "
                                                           "without it the twin serves loopback only"),
          https_cert: Path | None = typer.Option(None, help="serve HTTPS with this certificate (PEM)"),
          https_key: Path | None = typer.Option(None, help="...and this private key (PEM)"),
          rollout_key: Path | None = typer.Option(None, help="publisher's EC public key (PEM): enables model "
                                                             "rollouts of bundles signed with it"),
          rollout_url: str | None = typer.Option(None, help="the URL edge nodes reach this twin's API at "
                                                            "(default: the HTTP host and port)"),
          rollout_dir: Path = typer.Option(Path("runs/twin/rollouts"), help="where offered bundles are kept "
                                                                           "(with --workers: one folder all "
                                                                           "workers read)"),
          workers: int = typer.Option(1, help="twin workers sharing the plant through MQTT shared subscriptions "
                                              "(Mosquitto) and PostgreSQL (--db postgresql://...); worker k serves "
                                              "the API on --http-port + k"),
          worker_group: str = typer.Option("moeworks-twin", help="the workers' MQTT share group: workers started "
                                                                 "by hand with the same group, --workers and --db "
                                                                 "form one twin"),
          worker_id: str | None = typer.Option(None, help="run one worker of the group (0..N-1 takes that MQTT "
                                                          "session first); without it --workers N starts N"),
          as_json: bool = typer.Option(False, "--json", help="when the twin stops, print its final counters as one "
                                                             "JSON object on stdout")) -> None:
    """Run the twin: subscribe to the plant's namespace, serve the API and the dashboard until Ctrl-C."""
    import torch
    import uvicorn

    from twin.api.app import create_app
    from twin.auth import AuthError, TokenStore, check_bind
    from twin.domain.plant import DEFAULT_PLANT, Plant, PlantConfigError
    from twin.service import TwinConfig, TwinService
    from twin.store.history import StoreError

    try:  # before anything starts: a refused bind must not leave a twin subscribed to the broker
        check_bind(http_host, auth_file)
        tokens = TokenStore.load(auth_file) if auth_file is not None else None
    except AuthError as exc:
        _fail(exc)
    security = mqtt.security_or_exit(username=mqtt_username, password_file=mqtt_password_file, ca=mqtt_ca,
                                     cert=mqtt_cert, key=mqtt_key, tls=mqtt_tls)
    scale = None
    if workers != 1 or worker_id is not None:
        scale = _scale_or_exit(workers=workers, worker_group=worker_group, worker_id=worker_id, db=db,
                               config=TwinConfig(broker_host=broker_host, broker_port=broker_port, mqtt=security))
        if worker_id is None:  # the supervisor: N copies of this command, one per worker
            from twin.scaleout.supervisor import WorkerSupervisor
            from twin.scaleout.worker import ScaleOutError

            output.note(f"twin: {workers} workers (group {worker_group}), API on {http_host}:{http_port}.."
                        f"{http_port + workers - 1}")
            try:
                WorkerSupervisor(argv=sys.argv[1:], workers=workers, http_port=http_port).run()
            except ScaleOutError as exc:
                _fail(exc)
            return
    torch.set_num_threads(1)  # the twin scores one row at a time: more threads only contend on small machines
    try:
        model = Plant.from_yaml(plant or DEFAULT_PLANT)
        config = TwinConfig(broker_host=broker_host, broker_port=broker_port, db=db, mes_url=mes_url, mqtt=security,
                            work_orders_csv=str(work_orders_csv) if work_orders_csv else None,
                            rul_model=str(rul_model) if rul_model else None,
                            ai4i_model=str(ai4i_model) if ai4i_model else None, payload=payload)
        if (https_cert is None) != (https_key is None):
            raise ValueError("--https-cert and --https-key go together")
        if scale is None:
            service = TwinService(config=config, plant=model).start()
        else:
            from twin.scaleout.worker import ScaledTwinService

            service = ScaledTwinService(config=config, scale=scale, plant=model).start()
        rollouts = None
        if rollout_key is not None:
            from twin.rollout.manager import RolloutConfig, RolloutManager

            scheme = "https" if https_cert else "http"
            # a worker's NCMDs name worker 0's port by default (the supervisor restarts it): the files are served
            # by every worker, so a front that reaches any of them (--rollout-url) serves them too
            port = http_port - scale.home_slot if scale is not None and scale.home_slot is not None else http_port
            rollouts = RolloutManager(config=RolloutConfig(
                folder=rollout_dir, publisher_key=rollout_key,
                base_url=rollout_url or f"{scheme}://{http_host}:{port}"), service=service).start_thread()
    except (PlantConfigError, StoreError, ValueError) as exc:  # ValueError: the maintenance models' data errors
        _fail(exc)
    output.note(f"twin: {len(model.machines)} assets of {model.site}; broker {broker_host}:{broker_port}"
                f"{' (TLS)' if security and security.uses_tls else ''}; "
                f"dashboard http://{http_host}:{http_port}/")
    try:
        uvicorn.run(create_app(service, tokens=tokens, rollouts=rollouts), host=http_host, port=http_port,
                    log_level="warning", ssl_certfile=https_cert, ssl_keyfile=https_key)
    finally:
        if rollouts is not None:
            rollouts.stop()
        service.stop()
    if as_json:  # a long-running command's result: what it did before it was stopped
        output.emit("twin.serve", {"plant": str(plant or DEFAULT_PLANT), "db": db, "assets": len(model.machines),
                                   "http": f"http://{http_host}:{http_port}/", **service.stats()})


def _scale_or_exit(*, workers: int, worker_group: str, worker_id: str | None, db: str, config):
    """The worker's ScaleOutConfig, after the checks a group of workers needs; a mistake exits 2."""
    from twin.scaleout.worker import ScaleOutConfig, ScaleOutError, share_probe

    if not 1 <= workers <= 256:
        _fail(f"--workers must be 1..256, got {workers}")
    if not db.startswith(("postgresql://", "postgres://")):
        _fail("twin workers share their state in PostgreSQL: --db must be a postgresql:// URL")
    try:
        scale = ScaleOutConfig(worker=worker_id or "supervisor", slots=workers, worker_group=worker_group,
                               home_slot=int(worker_id) if worker_id and worker_id.isdigit()
                               and int(worker_id) < workers else None)
        share_probe(config, worker_group)
    except (ValueError, ScaleOutError) as exc:
        _fail(exc)
    except ConnectionError as exc:
        _fail(f"cannot reach the MQTT broker at {config.broker_host}:{config.broker_port}: {exc}")
    return scale


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
         as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object on stdout"),
         mqtt_cert: Path | None = typer.Option(None, "--mqtt-cert", help="the broker's certificate (PEM, for "
                                                                        "127.0.0.1): MQTT over TLS, with passwords"),
         mqtt_key: Path | None = typer.Option(None, "--mqtt-key", help="private key (PEM) of --mqtt-cert"),
         mqtt_ca: Path | None = typer.Option(None, "--mqtt-ca", help="CA (PEM) the clients check the broker "
                                                                     "against"),
         force: bool = typer.Option(False, "--force", help="use a non-empty --out: replaces what an earlier demo "
                                                           "made there, never anything else")) -> None:
    """Broker, edge agents, twin and dashboard on this machine, no set-up; prints the dashboard's address."""
    import torch

    from deploy.twin_demo import DemoOutputError, run_twin_demo
    from twin.mqtt.security import MQTTSecurity, MQTTSecurityError

    broker_tls = None
    if mqtt_cert or mqtt_key or mqtt_ca:
        if not (mqtt_cert and mqtt_key and mqtt_ca):
            _fail(ValueError("the demo over TLS needs --mqtt-cert, --mqtt-key and --mqtt-ca together"))
        try:  # the same checks the clients make, before anything starts
            MQTTSecurity(cert=mqtt_cert, key=mqtt_key, ca=mqtt_ca).ssl_context()
        except MQTTSecurityError as exc:
            _fail(exc)
        broker_tls = (mqtt_cert, mqtt_key, mqtt_ca)
    torch.set_num_threads(1)  # the twin scores one row at a time: more threads only contend on small machines
    try:
        summary = run_twin_demo(out, data_root=_data_root(data), duration_s=5.0 if quick else duration,
                                rate_hz=20.0 if quick else rate, rul_model=rul_model, ai4i_model=ai4i_model,
                                train_models=train_models, quick=quick, force=force, broker_tls=broker_tls,
                                console=output.console(as_json=as_json))
    except DemoOutputError as exc:  # raised before anything starts or is deleted
        _fail(exc)
    if as_json:
        output.emit("twin.demo", {"out": str(out), **summary})


@app.command()
def etl(db: str = typer.Option("runs/twin/twin.db", help="SQLite file or postgresql:// URL of the twin's history"),
        out: Path = typer.Option(Path("runs/twin/daily"), help="folder for <YYYY-MM-DD>.parquet"),
        day: list[str] = typer.Option(None, help="UTC day(s) to (re)build; default: every day in the history"),
        as_json: bool = JSON) -> None:
    """Aggregate the history into one Parquet file per UTC day (per device and metric)."""
    import sqlite3

    from twin.store.etl import run_etl
    from twin.store.history import HistoryStore, StoreError

    try:
        store = HistoryStore(db)
        files = run_etl(store, out, days=day or None)
    except (StoreError, ValueError) as exc:
        _fail(exc)
    except sqlite3.DatabaseError as exc:  # a folder, or a file that is not an SQLite database
        _fail(f"--db {db}: not a readable SQLite history ({exc})")
    store.close()
    if as_json:
        output.emit("twin.etl", {"db": db, "out": str(out), "files": [str(path) for path in files]})
        return
    for path in files:
        typer.echo(str(path))
    output.note(f"{len(files)} daily file(s) in {out}")


@app.command()
def broker(port: int = typer.Option(1883, help="port (8883 is MQTT over TLS's)"),
           host: str = typer.Option("127.0.0.1", help="address to bind; beyond loopback only with "
                                                      "--password-file and TLS (--mqtt-cert, --mqtt-key)"),
           password_file: Path | None = typer.Option(None, help="users allowed in (`moeworks twin broker-passwd`); "
                                                                "anonymous clients are then refused"),
           mqtt_cert: Path | None = typer.Option(None, "--mqtt-cert", help="the broker's certificate (PEM): "
                                                                           "the listener speaks TLS only"),
           mqtt_key: Path | None = typer.Option(None, "--mqtt-key", help="private key (PEM) of --mqtt-cert"),
           mqtt_ca: Path | None = typer.Option(None, "--mqtt-ca", help="CA (PEM) of client certificates, "
                                                                       "which clients may then present")) -> None:
    """An in-process MQTT broker (amqtt) for trying the edge and the twin without Mosquitto."""
    from twin.auth import is_loopback
    from twin.mqtt.broker_passwd import BrokerPasswdError
    from twin.mqtt.embedded_broker import BrokerError, EmbeddedBroker

    if not is_loopback(host) and (password_file is None or mqtt_cert is None):
        _fail(ValueError(f"refusing to bind {host}: beyond loopback the broker needs --password-file and TLS "
                         "(--mqtt-cert, --mqtt-key)"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server = EmbeddedBroker(port=port, host=host, password_file=password_file, certfile=mqtt_cert,
                                keyfile=mqtt_key, cafile=mqtt_ca)
    except (BrokerError, BrokerPasswdError) as exc:
        _fail(exc)
    with server:
        output.note(f"MQTT broker on {host}:{port} ({'TLS' if mqtt_cert else 'plaintext'}, "
                    f"{'password file ' + str(password_file) if password_file else 'anonymous clients allowed'}); "
                    "Ctrl-C stops it")
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass


@app.command("broker-passwd")
def broker_passwd(file: Path = typer.Option(..., help="the built-in broker's password file (made, 0600, if missing)"),
                  username: str = typer.Option(..., help="user to add or replace (an edge node's: its node id)"),
                  mqtt_password_file: mqtt.PasswordFile = None) -> None:
    """Add a user to `twin broker --password-file` (Argon2 hash); the password is read from
    --mqtt-password-file, $MOEWORKS_MQTT_PASSWORD or asked for, never from the command line."""
    import getpass

    from twin.mqtt.broker_passwd import BrokerPasswdError, set_password
    from twin.mqtt.security import PASSWORD_ENV, MQTTSecurityError, read_password_file

    try:
        if mqtt_password_file is not None:
            password = read_password_file(mqtt_password_file)
        elif os.environ.get(PASSWORD_ENV):
            password = os.environ[PASSWORD_ENV]
        else:
            password = getpass.getpass(f"password for {username}: ")
            if password != getpass.getpass("again: "):
                raise ValueError("the two passwords differ")
        set_password(file, username, password)
    except (BrokerPasswdError, MQTTSecurityError, ValueError) as exc:
        _fail(exc)
    output.note(f"{username} set in {file}")


@app.command("mosquitto-config")
def mosquitto_config(out: Path = typer.Option(..., help="folder for mosquitto.conf, passwd, acl and credentials/"),
                     mqtt_ca: Path = typer.Option(..., "--mqtt-ca", help="CA (PEM) of the client certificates"),
                     mqtt_cert: Path = typer.Option(..., "--mqtt-cert", help="the broker's certificate (PEM)"),
                     mqtt_key: Path = typer.Option(..., "--mqtt-key", help="the broker's private key (PEM)"),
                     plant: Path | None = typer.Option(None, help="plant file: one user per edge node; "
                                                                  "default: the demo plant"),
                     twin_user: str = typer.Option("moeworks-twin", help="the twin's username"),
                     port: int = typer.Option(8883), bind: str = typer.Option("127.0.0.1", help="address to listen "
                                                                                               "on (0.0.0.0: all)"),
                     require_certificate: bool = typer.Option(False, help="clients need a certificate from "
                                                                          "--mqtt-ca as well as a password"),
                     message_size_limit: int = typer.Option(256 * 1024, help="largest payload in bytes; "
                                                                             "Mosquitto drops larger ones"),
                     as_json: bool = JSON) -> None:
    """Write a Mosquitto config: TLS listener, no anonymous clients, a password per edge node and for
    the twin (credentials/<user>.password), and an ACL under which each node writes only its own topics."""
    from twin.domain.plant import DEFAULT_PLANT, Plant, PlantConfigError
    from twin.mqtt.mosquitto_config import MosquittoConfigError, MosquittoSecurity, write_mosquitto_security

    try:
        model = Plant.from_yaml(plant or DEFAULT_PLANT)
        paths = write_mosquitto_security(MosquittoSecurity(
            out=out, certfile=mqtt_cert, keyfile=mqtt_key, cafile=mqtt_ca, group=model.group,
            nodes=tuple(sorted(model.nodes)), twin_user=twin_user, port=port, bind=bind,
            require_certificate=require_certificate, message_size_limit=message_size_limit))
    except (PlantConfigError, MosquittoConfigError, OSError) as exc:
        _fail(exc)
    output.note(f"users: {twin_user}, {', '.join(sorted(model.nodes))} (passwords in {paths['credentials']})")
    output.note(f"run: mosquitto -c {paths['conf'].resolve()}")
    if as_json:
        output.emit("twin.mosquitto-config", {"out": str(out), "plant": str(plant or DEFAULT_PLANT), "users":
                                              [twin_user, *sorted(model.nodes)],
                                              "files": {name: str(path) for name, path in paths.items()}})
    else:
        typer.echo(str(paths["conf"]))
