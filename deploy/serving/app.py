"""The FastAPI app: validate, queue into the dynamic batcher, answer per request.

POST /v1/predict  {"instances": [{input: value, ...}, ...], "timeout_ms": optional}
    200 {"model", "model_version", "runtime", "predictions": [{output: value}, ...]}
    422 {"detail": [{"loc": [...field path...], "msg", "type"}]} for a malformed request
    503 + Retry-After when the queue is full (or the model is still loading)
    504 when the request's deadline passed before it was computed
GET /healthz (alive), /readyz (model loaded and warmed up), /v1/model, /metrics (Prometheus).
Every JSON answer carries `model_version`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from core.batcher import BatcherConfig, DeadlineExceeded, DynamicBatcher, QueueFull
from deploy.serving.adapters import InvalidRequest, ModelAdapter, row_to_json
from deploy.serving.metrics import ServingMetrics


@dataclass
class ServerState:
    adapter: ModelAdapter | None = None
    batcher: DynamicBatcher | None = None
    ready: bool = False


def _warm_up(adapter: ModelAdapter, max_rows: int) -> None:
    """Run the batch sizes the adapter names (those compiled models specialise on) before traffic."""
    adapter.prepare_thread()  # a thread pool's thread, not necessarily the one that loaded the model
    for rows in adapter.warm_up_sizes(max_rows):
        adapter.run_batch([adapter.example(rows, seed=rows)])


def create_app(load_adapter: Callable[[], ModelAdapter], *, batcher_config: BatcherConfig | None = None,
               max_request_rows: int = 256, warm_up: bool = True) -> FastAPI:
    """An app serving the adapter that `load_adapter()` builds (called once, at start-up)."""
    batcher_config = batcher_config or BatcherConfig()
    metrics = ServingMetrics()
    state = ServerState()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        adapter = await run_in_threadpool(load_adapter)  # loading, quantizing, compiling: seconds
        if warm_up:
            await run_in_threadpool(_warm_up, adapter, batcher_config.max_batch_size)
        # The ~200k objects of torch, the model and the framework live as long as the process. Moved
        # out of the collector's reach, a full collection no longer walks them: measured here, one
        # walk stalled the process (GIL held, every in-flight request) for ~300 ms.
        gc.collect()
        gc.freeze()
        state.adapter = adapter
        state.batcher = DynamicBatcher(adapter.run_batch, config=batcher_config, initializer=adapter.prepare_thread,
                                       on_batch=metrics.observe_batch, on_expired=metrics.expired).start()
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            state.batcher.stop()

    app = FastAPI(title="moeworks serving", lifespan=lifespan)
    app.state.serving = state
    app.state.metrics = metrics

    def answer(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        version = state.adapter.version if state.adapter else None
        return JSONResponse({**body, "model_version": version}, status_code=status, headers=headers)

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        if not state.ready:
            metrics.rejected.labels(reason="not_ready").inc()
            return answer(503, {"error": "model is loading"}, {"Retry-After": "5"})
        adapter, batcher = state.adapter, state.batcher
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            metrics.requests.labels(outcome="invalid").inc()
            return answer(422, {"detail": [{"loc": ["body"], "msg": f"invalid JSON: {error}", "type": "json_invalid"}]})
        try:
            inputs, rows = adapter.parse(payload, max_rows=max_request_rows)
            timeout_s = _timeout(payload)
        except InvalidRequest as error:
            metrics.requests.labels(outcome="invalid").inc()
            return answer(422, {"detail": [{"loc": error.loc, "msg": error.message, "type": "value_error"}]})
        try:
            future = batcher.submit(inputs, rows=rows, timeout_s=timeout_s)
        except QueueFull as error:
            metrics.rejected.labels(reason="queue_full").inc()
            return answer(503, {"error": "queue full"}, {"Retry-After": str(math.ceil(error.retry_after_s))})
        try:
            outputs = await asyncio.wrap_future(future)
        except DeadlineExceeded as error:
            metrics.requests.labels(outcome="expired").inc()
            return answer(504, {"error": f"deadline exceeded: {error}"})
        except Exception as error:  # noqa: BLE001 - a failed batch is this request's 500, not the server's crash
            metrics.requests.labels(outcome="failed").inc()
            return answer(500, {"error": f"{type(error).__name__}: {error}"})
        metrics.requests.labels(outcome="ok").inc()
        metrics.latency.observe(time.perf_counter() - started)
        return answer(200, {"model": adapter.name, "runtime": adapter.runtime,
                            "predictions": [row_to_json(outputs, i) for i in range(rows)]})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return answer(200, {"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not state.ready:
            return answer(503, {"status": "loading"}, {"Retry-After": "5"})
        return answer(200, {"status": "ready", "queued_rows": state.batcher.queued_rows,
                            "batch_limit": state.batcher.limit})

    @app.get("/v1/model")
    async def model_info() -> JSONResponse:
        if not state.ready:
            return answer(503, {"status": "loading"}, {"Retry-After": "5"})
        return answer(200, {**state.adapter.describe(), "batcher": vars(batcher_config)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app


def _timeout(payload: dict) -> float | None:
    value = payload.get("timeout_ms")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidRequest(["body", "timeout_ms"], "expected a positive number of milliseconds")
    return value / 1000
