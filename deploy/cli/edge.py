"""`moeworks edge run`: one edge node publishing one machine to the twin."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import typer

from twin.mqtt import cli_options as mqtt

app = typer.Typer(help="Edge devices: publish machine telemetry over MQTT (Sparkplug B).",
                  no_args_is_help=True)


@app.command()
def run(source: str = typer.Option("sim-mill", help="cmapss | ai4i (replays of real data) | sim-engine | sim-mill"),
        data: Path | None = typer.Option(None, envvar="MOEWORKS_DATA", help="data folder (like ../shared/data)"),
        unit: int = typer.Option(1, help="C-MAPSS engine (unit number) to replay"),
        subset: str = typer.Option("FD001", help="C-MAPSS subset"),
        start_row: int = typer.Option(0, help="AI4I row to start the replay at"),
        seed: int = typer.Option(0, help="seed of a simulated machine"),
        rate: float = typer.Option(1.0, help="ticks (cycles or processes) per second"),
        host: str = typer.Option("127.0.0.1", "--host", "--broker-host", help="MQTT broker"),
        port: int = typer.Option(1883, "--port", "--broker-port", help="MQTT broker's port (8883 for TLS)"),
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
        as_json: bool = typer.Option(False, "--json", help="print counters as JSON on the last line"),
        mqtt_username: mqtt.Username = None, mqtt_password_file: mqtt.PasswordFile = None,
        mqtt_tls: mqtt.Tls = False, mqtt_ca: mqtt.Ca = None, mqtt_cert: mqtt.Cert = None,
        mqtt_key: mqtt.Key = None) -> None:
    """Publish until the source ends, --max-messages, --duration or Ctrl-C; the spool keeps what is unsent."""
    from deploy.edge.agent import EdgeAgent, EdgeConfig, default_spool
    from deploy.edge.sources import SourceError, make_source

    security = mqtt.security_or_exit(username=mqtt_username, password_file=mqtt_password_file, ca=mqtt_ca,
                                     cert=mqtt_cert, key=mqtt_key, tls=mqtt_tls)
    try:
        src = make_source(source, data=data, unit=unit, subset=subset, start_row=start_row, seed=seed)
        estimator = None
        if onnx:  # torch and onnxruntime load only when a model is asked for: small devices start fast
            from deploy.edge.inference import OnnxRULEstimator

            if not onnx.is_file():
                raise SourceError(f"--onnx {onnx}: no such ONNX file")
            try:
                estimator = OnnxRULEstimator(onnx)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's load errors share no base class but Exception
                raise SourceError(f"--onnx {onnx}: not a loadable ONNX RUL model ({str(exc).splitlines()[0][:200]})") \
                    from None
        slot = rollout = None
        if bundle is not None and bundle_key is None:
            raise SourceError("--bundle needs --bundle-key (the publisher's public key) to verify it")
        if bundle_key is not None:
            from deploy.edge.model_slot import ModelSlot
            from deploy.edge.rollout import RolloutAgentConfig, RolloutClient

            if rollout_ca is not None and not rollout_ca.is_file():
                raise SourceError(f"--rollout-ca {rollout_ca}: no such file")
            slot = ModelSlot(models or Path("runs/edge") / f"{node}.models", publisher_key=bundle_key)
            if bundle is not None and slot.active is None:
                slot.install_initial(bundle)
            rollout = RolloutClient(slot=slot, config=RolloutAgentConfig(ca=rollout_ca,
                                                                         max_download_bps=max_download_bps))
    except (SourceError, ValueError) as exc:  # ModelError is a ValueError
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if rate <= 0:
        typer.echo("error: --rate must be positive", err=True)
        raise typer.Exit(2)
    try:
        config = EdgeConfig(host=host, port=port, group=group, node=node, device=device, rate_hz=rate,
                            spool=spool or default_spool(node), max_messages=max_messages, duration_s=duration,
                            security=security, payload=payload, primary_host=primary_host)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    typer.echo(f"edge {node}/{device}: {src.description} -> {host}:{port}"
               f"{' (TLS)' if security and security.uses_tls else ''} at {rate:g} Hz", err=True)
    try:
        stats = EdgeAgent(config=config, source=src, estimator=estimator, model=slot, rollout=rollout).run(stop)
    except KeyboardInterrupt:
        stop.set()
        return
    if slot is not None:
        stats = stats | {"model": slot.version, **slot.stats, **rollout.stats}
    typer.echo(json.dumps(stats) if as_json else ", ".join(f"{k} {v}" for k, v in stats.items()))


@app.command()
def quantize(model: Path = typer.Option(..., help="ONNX RUL model (e.g. from `moeworks maintenance export`)"),
             out: Path = typer.Option(..., help="INT8 model to write")) -> None:
    """Make an INT8 copy of an ONNX model for small devices (dynamic quantisation; metadata kept)."""
    from deploy.edge.quantize import quantize_for_edge

    if not model.is_file():
        typer.echo(f"error: {model}: no such ONNX file", err=True)
        raise typer.Exit(2)
    from google.protobuf.message import DecodeError

    try:
        path = quantize_for_edge(model, out)
    except (ValueError, OSError, DecodeError) as exc:
        typer.echo(f"error: {model}: not a quantizable ONNX model ({str(exc).splitlines()[0][:200]})", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{path} ({path.stat().st_size:,} bytes, from {model.stat().st_size:,})")


if __name__ == "__main__":
    app()
