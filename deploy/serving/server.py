"""Run the serving app under gunicorn with uvicorn workers (as the seed's container does)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from deploy.serving.base import AdapterOptions
from deploy.serving.batcher import BatcherConfig
from deploy.serving.limits import RequestLimits


@dataclass
class ServeConfig:
    model: Path
    adapter: AdapterOptions = field(default_factory=AdapterOptions)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    host: str = "127.0.0.1"  # loopback unless asked: a model server is not exposed by accident
    port: int = 8080
    workers: int = 1  # one process per model copy; the batcher batches within a process
    limits: RequestLimits = field(default_factory=RequestLimits)  # body size, instances, nesting, timeout_ms
    auth_file: Path | None = None  # `moeworks auth token` file; None: loopback only, no tokens
    startup_timeout_s: int = 600  # quantizing and compiling at start-up take minutes on 2 cores


def build_app(config: ServeConfig):
    from deploy.serving.app import create_app
    from deploy.serving.registry import REGISTRY

    return create_app(lambda: REGISTRY.from_path(config.model, config.adapter), batcher_config=config.batcher,
                      limits=config.limits, auth_file=config.auth_file)


def run_gunicorn(config: ServeConfig) -> None:
    """Blocks: gunicorn master plus `config.workers` uvicorn workers, each loading the model."""
    from gunicorn.app.base import BaseApplication

    from twin.auth import check_bind

    check_bind(config.host, config.auth_file)  # the CLI checked it too; a library caller gets the same rule

    class GunicornApp(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{config.host}:{config.port}")
            self.cfg.set("workers", config.workers)
            self.cfg.set("worker_class", "uvicorn.workers.UvicornWorker")
            self.cfg.set("timeout", config.startup_timeout_s)  # a worker compiling is not a hung worker
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("keepalive", 30)
            self.cfg.set("accesslog", None)

        def load(self):
            # Inductor logs a traceback for every cache key it cannot pickle (torchao tensors); noise.
            logging.getLogger("torch._inductor.codecache").setLevel(logging.ERROR)
            return build_app(config)

    GunicornApp().run()
