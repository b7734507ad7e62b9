"""`moeworks serve`: serve a saved model (checkpoint or ONNX) with dynamic batching."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(model: Path = typer.Argument(..., help="a core checkpoint (.pt), an ONNX file (.onnx), a credit model "
                                                   "folder (finance train --model moe), a RUL model folder "
                                                   "(maintenance train) or its .onnx, a defects run or export "
                                                   "folder, its detector.pt or the detector's .onnx"),
          host: str = typer.Option("127.0.0.1", help="address to bind"),
          port: int = typer.Option(8080, help="port to bind"),
          workers: int = typer.Option(1, help="gunicorn worker processes (one model copy each)"),
          threads: int = typer.Option(1, help="intra-op threads per worker"),
          quantize: str = typer.Option("none", help="none | int8_dynamic | int8_weight_only (torch) | "
                                                    "int8_dynamic | int8_static (onnx)"),
          fuse: bool = typer.Option(False, help="torch.compile the dense parts (torch runtime)"),
          calibration: Path = typer.Option(None, help=".npz of named inputs for AWQ/static calibration"),
          camera: Path = typer.Option(None, help="defects: JSON/YAML with mm_per_pixel(_x/_y) and min_size_mm"),
          conf: float = typer.Option(0.25, help="defects: score threshold of reported boxes"),
          batching: bool = typer.Option(True, help="dynamic batching; --no-batching runs one request per forward"),
          max_batch: int = typer.Option(128, help="ceiling of the adaptive batch size (rows)"),
          max_wait_ms: float = typer.Option(4.0, help="longest a request waits for company"),
          max_queue: int = typer.Option(2048, help="queued rows before answering 503"),
          timeout_ms: float = typer.Option(2000.0, help="default per-request deadline")) -> None:
    """Serve a model over HTTP: POST /v1/predict, /healthz, /readyz, /metrics."""
    from core.batcher import BatcherConfig
    from deploy.serving.adapters import AdapterOptions, check_model_path
    from deploy.serving.defects import is_defects_folder
    from deploy.serving.maintenance import is_rul_folder
    from deploy.serving.server import ServeConfig, run_gunicorn

    if not (model.is_file() or (model / "scorer.json").is_file() or is_rul_folder(model) or is_defects_folder(model)):
        typer.echo(f"error: model: no model file, credit, RUL or defects model folder at {model}", err=True)
        raise typer.Exit(2)
    try:  # before any worker starts: a changed model folder or a pickled .pt is one line, not a boot failure
        check_model_path(model)
    except ValueError as error:
        typer.echo(f"error: model: {error}", err=True)
        raise typer.Exit(2) from None
    if not 0 <= conf <= 1:
        typer.echo(f"error: --conf: a score threshold in [0, 1], got {conf}", err=True)
        raise typer.Exit(2)
    if camera is not None and not camera.is_file():
        typer.echo(f"error: --camera: no calibration file at {camera}", err=True)
        raise typer.Exit(2)
    if quantize not in ("none", "int8_dynamic", "int8_weight_only", "int8_static"):
        typer.echo(f"error: --quantize: unknown scheme {quantize!r}", err=True)
        raise typer.Exit(2)
    try:
        size = max_batch if batching else 1
        batcher = BatcherConfig(min_batch_size=min(5, size), max_batch_size=size,
                                initial_batch_size=min(32, size), max_wait_s=max_wait_ms / 1000 if batching else 0.0,
                                max_queue_rows=max_queue, default_timeout_s=timeout_ms / 1000)
    except AssertionError as error:
        typer.echo(f"error: batching options: {error}", err=True)
        raise typer.Exit(2) from None
    run_gunicorn(ServeConfig(model=model, host=host, port=port, workers=workers, batcher=batcher,
                             adapter=AdapterOptions(quantize=quantize, fuse=fuse, calibration=calibration,
                                                    threads=threads, camera=camera, conf=conf)))
