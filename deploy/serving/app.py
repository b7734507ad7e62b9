"""The FastAPI app: check at the door, admit or refuse, queue into the dynamic batcher, answer.

POST /v1/predict  {"instances": [{input: value, ...}, ...], "timeout_ms": optional}
    200 {"model", "model_version", "runtime", "predictions": [{output: value}, ...]}
    413 body over --max-body-mb (refused before it is all read)
    422 {"detail": [{"loc": [...field path...], "msg", "type"}]}: not JSON, nested too deep, a
        number that overflows, a boolean or string for a number, a value outside float32, too many
        instances, a `timeout_ms` outside [1, max] ms
    503 + Retry-After: admission control (the work ahead would miss this request's deadline), a
        full queue, or the model still loading
    504 the deadline passed before the request was computed
    401/403 with --auth-file: a missing or unknown bearer token / too small a role (operator)
GET /healthz (alive) and /readyz (model loaded and warmed up): open, for probes.
GET /v1/model (viewer) and /metrics (viewer; Prometheus text, every status of every route counted
in moeworks_http_responses_total). Without a token file the server binds loopback only and every
local caller may use every route.

Nothing long runs on the event loop: bodies over `offload_bytes` are parsed and validated in a
worker thread, the model runs in the batcher's thread, so /healthz and /metrics answer while big
bodies are parsed and the model is busy. Every JSON answer carries `model_version`.
"""

from __future__ import annotations

import asyncio
import gc
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from deploy.serving.base import ModelAdapter, row_to_json
from deploy.serving.batcher import BatcherConfig, DeadlineExceeded, DynamicBatcher, Overloaded, QueueFull
from deploy.serving.limits import RequestLimits, RequestRefused, parse_json, request_timeout_s
from deploy.serving.metrics import ServingMetrics


class JSONAnswer(Response):
    """A JSON answer serialised by orjson (C; several times faster than json for 256-row answers)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass
class ServerState:
    adapter: ModelAdapter | None = None
    batcher: DynamicBatcher | None = None
    parser: ThreadPoolExecutor | None = None  # parses large bodies off the event loop
    ready: bool = False


def _warm_up(adapter: ModelAdapter, max_rows: int) -> list[tuple[int, float]]:
    """Run the batch sizes the adapter names (those compiled models specialise on) before traffic;
    returns (rows, seconds) of each, the first measurements of the service time."""
    adapter.prepare_thread()  # a thread pool's thread, not necessarily the one that loaded the model
    timings = []
    for rows in adapter.warm_up_sizes(max_rows):
        example = adapter.example(rows, seed=rows)
        adapter.run_batch([example])  # the first run of a size compiles or fills caches: not timed
        started = time.perf_counter()
        adapter.run_batch([example])
        timings.append((rows, time.perf_counter() - started))
    return timings


class _StatusCounter:
    """ASGI middleware: count every answer by route and status (an unhandled error too, as a 500
    in JSON: the process never answers with a traceback)."""

    def __init__(self, app: Any, metrics: ServingMetrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else "other"  # bounded label values
        status = [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:  # noqa: BLE001 - the one place where an unexpected error becomes a 500
            if status[0]:
                raise  # the answer had started: nothing can be said any more
            status[0] = 500
            body = JSONAnswer({"error": f"internal error: {type(error).__name__}"}, status_code=500)
            await body(scope, receive, send)
        finally:
            self.metrics.responses.labels(route=route, status=str(status[0] or 500)).inc()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestRefused(413, ["body"], f"body of {int(declared)} bytes; at most {limit}", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked uploads carry no length: count as they come
        size += len(chunk)
        if size > limit:
            raise RequestRefused(413, ["body"], f"body over {limit} bytes", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class _BodySizes:
    """Bytes per row of the bodies parsed so far (EWMA): a body's size then estimates its rows."""

    def __init__(self) -> None:
        self.bytes_per_row = 0.0

    def observe(self, size: int, rows: int) -> None:
        if rows >= 1:
            ratio = size / rows
            self.bytes_per_row = ratio if not self.bytes_per_row else 0.9 * self.bytes_per_row + 0.1 * ratio


_TIMEOUT = re.compile(rb'"timeout_ms"\s*:\s*([0-9.eE+-]{1,32})')


def _declared_timeout_s(body: bytes, limits: RequestLimits) -> float | None:
    """The `timeout_ms` a body seems to carry, read without parsing it (for the early admission
    check only; the parsed value decides after). None: not found, the default applies."""
    found = _TIMEOUT.search(body)
    if found is None:
        return None
    try:
        value = float(found.group(1))
    except ValueError:
        return None
    return min(value, limits.max_timeout_ms) / 1000 if math.isfinite(value) and value >= 1 else None


def create_app(load_adapter: Callable[[], ModelAdapter], *, batcher_config: BatcherConfig | None = None,
               max_request_rows: int | None = None, limits: RequestLimits | None = None,
               auth_file: Path | None = None, warm_up: bool = True) -> FastAPI:
    """An app serving the adapter that `load_adapter()` builds (called once, at start-up).

    auth_file: a `moeworks auth token` file; given, /v1/predict needs an operator token and
    /v1/model and /metrics a viewer token (the caller, not this function, keeps an
    unauthenticated server on loopback: twin.auth.check_bind).
    """
    from twin.auth import TokenStore, role_dependency

    batcher_config = batcher_config or BatcherConfig()
    limits = limits or RequestLimits()
    if max_request_rows is not None:
        limits.max_instances = max_request_rows
    store = TokenStore.load(auth_file) if auth_file is not None else None
    operator, viewer = role_dependency(store, "operator"), role_dependency(store, "viewer")
    metrics = ServingMetrics()
    state = ServerState()
    sizes = _BodySizes()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        adapter = await run_in_threadpool(load_adapter)  # loading, quantizing, compiling: seconds
        timings = await run_in_threadpool(_warm_up, adapter, batcher_config.max_batch_size) if warm_up else []
        # The ~200k objects of torch, the model and the framework live as long as the process. Moved
        # out of the collector's reach, a full collection no longer walks them: measured here, one
        # walk stalled the process (GIL held, every in-flight request) for ~300 ms.
        gc.collect()
        gc.freeze()
        state.adapter = adapter
        state.batcher = DynamicBatcher(adapter.run_batch, config=batcher_config, initializer=adapter.prepare_thread,
                                       on_batch=metrics.observe_batch, on_expired=metrics.expired)
        for rows, seconds in timings:
            state.batcher.observe(rows, seconds)
        state.batcher.start()
        state.parser = ThreadPoolExecutor(limits.parse_threads, thread_name_prefix="parse")
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            state.batcher.stop()
            state.parser.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="moeworks serving", lifespan=lifespan, default_response_class=JSONAnswer)
    app.state.serving = state
    app.state.metrics = metrics
    app.state.limits = limits

    def answer(status: int, body: dict, headers: dict | None = None) -> JSONAnswer:
        version = state.adapter.version if state.adapter else None
        return JSONAnswer({**body, "model_version": version}, status_code=status, headers=headers)

    def refused(error: RequestRefused) -> JSONAnswer:
        metrics.requests.labels(outcome="invalid" if error.status == 422 else "too_large").inc()
        return answer(error.status, {"detail": [{"loc": error.loc, "msg": error.message, "type": error.kind}]})

    def decode(body: bytes, adapter: ModelAdapter) -> tuple[dict, int, float | None]:
        payload = parse_json(body, limits)
        inputs, rows = adapter.parse(payload, max_rows=limits.max_instances)
        return inputs, rows, request_timeout_s(payload, limits)

    @app.post("/v1/predict", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}}}},
        responses={413: {"description": "body too large"}, 422: {"description": "malformed request"},
                   503: {"description": "overloaded or loading; see Retry-After"},
                   504: {"description": "deadline passed before the request was computed"}})
    async def predict(request: Request, _caller=Depends(operator)) -> JSONAnswer:
        started = time.perf_counter()
        if not state.ready:
            metrics.rejected.labels(reason="not_ready").inc()
            return answer(503, {"error": "model is loading"}, {"Retry-After": "5"})
        adapter, batcher = state.adapter, state.batcher
        received = batcher.clock()  # the deadline runs from arrival: reading and parsing count
        try:
            body = await read_body(request, limits.max_body_bytes)
        except RequestRefused as error:
            return refused(error)
        except ClientDisconnect:  # the client left mid-body: nobody to answer; counted as nginx does (499)
            metrics.requests.labels(outcome="disconnected").inc()
            return answer(499, {"error": "client disconnected"})
        if sizes.bytes_per_row:  # refuse before parsing: under 3x overload, parsing what is then refused
            try:               # took the CPU the admitted requests needed (measured: benchmarks/serving.py)
                batcher.check_admission(len(body) / sizes.bytes_per_row, received=received,
                                        timeout_s=_declared_timeout_s(body, limits))
            except Overloaded as error:
                metrics.rejected.labels(reason="overloaded").inc()
                return answer(503, {"error": str(error)}, {"Retry-After": str(math.ceil(error.retry_after_s))})
        try:
            if len(body) > limits.offload_bytes:  # parsing 100k instances took seconds: never on the loop
                inputs, rows, timeout_s = await asyncio.get_running_loop().run_in_executor(
                    state.parser, decode, body, adapter)
            else:
                inputs, rows, timeout_s = decode(body, adapter)
        except RequestRefused as error:
            return refused(error)
        sizes.observe(len(body), rows)
        try:
            future = batcher.submit(inputs, rows=rows, timeout_s=timeout_s, received=received)
        except Overloaded as error:
            metrics.rejected.labels(reason="overloaded").inc()
            return answer(503, {"error": str(error)}, {"Retry-After": str(math.ceil(error.retry_after_s))})
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
    async def healthz() -> JSONAnswer:
        return answer(200, {"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> JSONAnswer:
        if not state.ready:
            return answer(503, {"status": "loading"}, {"Retry-After": "5"})
        return answer(200, {"status": "ready", "queued_rows": state.batcher.queued_rows,
                            "batch_limit": state.batcher.limit})

    @app.get("/v1/model")
    async def model_info(_caller=Depends(viewer)) -> JSONAnswer:
        if not state.ready:
            return answer(503, {"status": "loading"}, {"Retry-After": "5"})
        return answer(200, {**state.adapter.describe(), "batcher": asdict(batcher_config), "limits": asdict(limits)})

    @app.get("/metrics")
    async def prometheus(_caller=Depends(viewer)) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    def openapi() -> dict:
        """The OpenAPI document, with the loaded model's instance schema (a generic one before)."""
        if app.openapi_schema is not None and state.ready:
            return app.openapi_schema
        document = get_openapi(title=app.title, version="1", routes=app.routes)
        instance = state.adapter.instance_schema() if state.ready else {"type": "object"}
        document.setdefault("components", {}).setdefault("schemas", {})["PredictRequest"] = {
            "type": "object", "required": ["instances"], "additionalProperties": False, "properties": {
                "instances": {"type": "array", "items": instance, "minItems": 1, "maxItems": limits.max_instances},
                "timeout_ms": {"type": "number", "minimum": 1, "maximum": limits.max_timeout_ms}}}
        if store is not None:
            document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        if state.ready:
            app.openapi_schema = document
        return document

    app.openapi = openapi
    app.add_middleware(_StatusCounter, metrics=metrics, routes={"/v1/predict", "/healthz", "/readyz", "/v1/model",
                                                                "/metrics", "/openapi.json", "/docs"})
    return app
