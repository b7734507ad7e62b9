"""`moeworks edge run`: one edge node publishing one machine to the twin."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer

from deploy.cli import output
from deploy.cli.errors import UserInputError
from twin.mqtt import cli_options as mqtt

app = typer.Typer(help="Edge devices: publish machine telemetry over MQTT (Sparkplug B).",
                  no_args_is_help=True)


@app.command()
def run(kind: str = typer.Option("sim-mill", help="kind of source: cmapss | ai4i (replays of real data) | sim-engine "
                                                 "| sim-mill (was --source)"),
        data: Path | None = typer.Option(None, envvar="MOEWORKS_DATA", help="data folder (like ../shared/data)"),
        unit: int = typer.Option(1, help="C-MAPSS engine (unit number) to replay"),
        subset: str = typer.Option("FD001", help="C-MAPSS subset"),
        start_row: int = typer.Option(0, help="AI4I row to start the replay at"),
        seed: int = typer.Option(0, help="seed of a simulated machine"),
        rate: float = typer.Option(1.0, help="ticks (cycles or processes) per second"),
        broker_host: str = typer.Option("127.0.0.1", help="MQTT broker (was --host)"),
        broker_port: int = typer.Option(1883, help="MQTT broker's port, 8883 for TLS (was --port)"),
        group: str = typer.Option("plant1", help="Sparkplug group id"),
        node: str = typer.Option("edge-mill-1", help="edge node id"),
        device: str = typer.Option("mill-1", help="device (machine) id, as in the twin's plant file"),
        spool: Path | None = typer.Option(None, help="store-and-forward file (default runs/edge/<node>.spool)"),
        onnx: Path | None = typer.Option(None, help="ONNX RUL model to run on the device (publishes rul_edge)"),
        bundle_key: Path | None = typer.Option(None, help="publisher's EC public key (PEM): run signed AI4I bundles "
                                                          "(publishes edge_failure) and take rollouts from the twin"),
        bundle: Path | None = typer.Option(None, help="a signed bundle to install when the node has no model yet"),
        models: Path | None = typer.Option(None, help="the node's model slot (default runs/edge/<node>.models)"),
        rollout_ca: Path | None = typer.Option(None, help="CA certificate (PEM) of the twin's HTTPS"),
        max_download_bps: float | None = typer.Option(None, help="cap a rollout's download rate (bytes/s)"),
        max_messages: int | None = typer.Option(None, help="stop after this many ticks"),
        duration: float | None = typer.Option(None, help="stop after this many seconds"),
        payload: str = typer.Option("protobuf", help="protobuf (Sparkplug B) | json"),
        primary_host: str | None = typer.Option(None, help="Sparkplug primary host id (the twin's MQTT client id, "
                                                          "moeworks-twin): hold data while its STATE is offline"),
        as_json: bool = typer.Option(False, "--json", help="print the counters as one JSON object on stdout"),
        mqtt_username: mqtt.Username = None, mqtt_password_file: mqtt.PasswordFile = None,
        mqtt_tls: mqtt.Tls = False, mqtt_ca: mqtt.Ca = None, mqtt_cert: mqtt.Cert = None,
        mqtt_key: mqtt.Key = None) -> None:
    """Publish until the source ends, --max-messages, --duration or Ctrl-C; the spool keeps what is unsent."""
    from deploy.edge.agent import EdgeAgent, EdgeConfig, default_spool
    from deploy.edge.sources import make_source

    security = mqtt.security_or_exit(username=mqtt_username, password_file=mqtt_password_file, ca=mqtt_ca,
                                     cert=mqtt_cert, key=mqtt_key, tls=mqtt_tls)
    src = make_source(kind, data=data, unit=unit, subset=subset, start_row=start_row, seed=seed)
    estimator = None
    if onnx:  # torch and onnxruntime load only when a model is asked for: small devices start fast
        from deploy.edge.inference import OnnxRULEstimator

        if not onnx.is_file():
            raise UserInputError(f"--onnx {onnx}: no such ONNX file")
        try:
            estimator = OnnxRULEstimator(onnx)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's load errors share no base class but Exception
            raise UserInputError(f"--onnx {onnx}: not a loadable ONNX RUL model "
                                 f"({str(exc).splitlines()[0][:200]})") from None
    slot = rollout = None
    if bundle is not None and bundle_key is None:
        raise UserInputError("--bundle needs --bundle-key (the publisher's public key) to verify it")
    if bundle_key is not None:
        from deploy.edge.model_slot import ModelSlot
        from deploy.edge.rollout import RolloutAgentConfig, RolloutClient

        if rollout_ca is not None and not rollout_ca.is_file():
            raise UserInputError(f"--rollout-ca {rollout_ca}: no such file")
        slot = ModelSlot(models or Path("runs/edge") / f"{node}.models", publisher_key=bundle_key)
        if bundle is not None and slot.active is None:
            slot.install_initial(bundle)
        rollout = RolloutClient(slot=slot, config=RolloutAgentConfig(ca=rollout_ca, max_download_bps=max_download_bps))
    if rate <= 0:
        raise UserInputError("--rate must be positive")
    try:
        config = EdgeConfig(host=broker_host, port=broker_port, group=group, node=node, device=device, rate_hz=rate,
                            spool=spool or default_spool(node), max_messages=max_messages, duration_s=duration,
                            security=security, payload=payload, primary_host=primary_host)
    except ValueError as exc:  # the config's checks of the flags' values
        raise UserInputError(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    output.note(f"edge {node}/{device}: {src.description} -> {broker_host}:{broker_port}"
                f"{' (TLS)' if security and security.uses_tls else ''} at {rate:g} Hz")
    try:
        stats = EdgeAgent(config=config, source=src, estimator=estimator, model=slot, rollout=rollout).run(stop)
    except KeyboardInterrupt:
        stop.set()
        return
    if slot is not None:
        stats = stats | {"model_version": slot.version, **slot.stats, **rollout.stats}
    output.say(", ".join(f"{k} {v}" for k, v in stats.items()), as_json=as_json)
    if as_json:
        output.emit("edge.run", {"kind": kind, "node": node, "device": device, **stats})


@app.command()
def quantize(model: Path = typer.Option(..., help="ONNX RUL model (e.g. from `moeworks maintenance export`)"),
             out: Path = typer.Option(..., help="INT8 model to write"),
             as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object on stdout"),
             ) -> None:
    """Make an INT8 copy of an ONNX model for small devices (dynamic quantisation; metadata kept)."""
    from deploy.edge.quantize import quantize_for_edge

    if not model.is_file():
        raise UserInputError(f"{model}: no such ONNX file")
    from google.protobuf.message import DecodeError

    try:
        path = quantize_for_edge(model, out)
    except (ValueError, OSError, DecodeError) as exc:
        raise UserInputError(f"{model}: not a quantizable ONNX model ({str(exc).splitlines()[0][:200]})") from None
    output.say(f"{path} ({path.stat().st_size:,} bytes, from {model.stat().st_size:,})", as_json=as_json)
    if as_json:
        output.emit("edge.quantize", {"model": str(model), "out": str(path), "bytes": path.stat().st_size,
                                      "source_bytes": model.stat().st_size})


if __name__ == "__main__":
    app()
