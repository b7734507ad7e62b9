"""`moeworks serve`: serve a saved model (checkpoint, ONNX or model folder) with dynamic batching."""

from __future__ import annotations

from pathlib import Path

import typer

from deploy.cli.errors import UserInputError


def serve(model: Path = typer.Option(..., help="a core checkpoint (.pt), an ONNX file (.onnx), a credit model "
                                                "folder (any `finance train` model: raw application fields), "
                                                "a RUL model folder (maintenance train) or its .onnx, a defects "
                                                "run or export folder, its detector.pt or the detector's .onnx"),
          host: str = typer.Option("127.0.0.1", help="address to bind; beyond loopback only with --auth-file"),
          port: int = typer.Option(8080, help="port to bind"),
          auth_file: Path = typer.Option(None, help="token file of `moeworks auth token`: predict needs an operator "
                                                    "token, /v1/model and /metrics a viewer token"),
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
          timeout_ms: float = typer.Option(2000.0, help="default per-request deadline"),
          max_timeout_ms: float = typer.Option(60000.0, help="largest `timeout_ms` a request may ask for"),
          admission_headroom: float = typer.Option(0.8, help="admit a request only if its estimated finish lies "
                                                             "within this share of its deadline (0: off)"),
          max_body_mb: float = typer.Option(16.0, help="largest request body (MiB); larger: 413"),
          max_instances: int = typer.Option(256, help="most instances (rows) per request; more: 422")) -> None:
    """Serve a model over HTTP: POST /v1/predict, /healthz, /readyz, /v1/model, /metrics."""
    from deploy.serving.base import AdapterOptions
    from deploy.serving.batcher import BatcherConfig
    from deploy.serving.limits import RequestLimits
    from deploy.serving.registry import REGISTRY
    from deploy.serving.server import ServeConfig, run_gunicorn
    from twin.auth import TokenStore, check_bind

    def fail(message: str) -> None:
        raise UserInputError(message)

    check_bind(host, auth_file)
    if auth_file is not None:
        TokenStore.load(auth_file)  # a broken token file is the user's mistake, said before start-up
    if camera is not None and not camera.is_file():
        fail(f"--camera: no calibration file at {camera}")
    try:  # the scheme's name, the threads, the score threshold
        options = AdapterOptions(quantize=quantize, fuse=fuse, calibration=calibration, threads=threads, camera=camera,
                                 conf=conf)
    except ValueError as error:
        fail(f"serving options: {error}")
    try:  # before any worker starts: an unknown, changed or pickled model is one line, not a boot failure
        REGISTRY.check(model, options)
    except (ValueError, FileNotFoundError) as error:
        fail(f"model: {error}")
    if not 0 < timeout_ms <= max_timeout_ms:
        fail(f"--timeout-ms: must lie in (0, --max-timeout-ms={max_timeout_ms:g}]")
    try:
        size = max_batch if batching else 1
        batcher = BatcherConfig(min_batch_size=min(5, size), max_batch_size=size,
                                initial_batch_size=min(32, size), max_wait_s=max_wait_ms / 1000 if batching else 0.0,
                                max_queue_rows=max_queue, default_timeout_s=timeout_ms / 1000,
                                admission_headroom=admission_headroom)
        limits = RequestLimits(max_body_bytes=int(max_body_mb * (1 << 20)), max_instances=max_instances,
                               max_timeout_ms=max_timeout_ms)
    except ValueError as error:
        fail(f"serving options: {error}")
    run_gunicorn(ServeConfig(model=model, host=host, port=port, workers=workers, batcher=batcher, limits=limits,
                             auth_file=auth_file, adapter=options))
