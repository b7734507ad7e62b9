"""The twin's REST API (FastAPI; schema at /openapi.json, docs at /docs) and its live dashboard (/),
one router per resource (twin/api/routes/).

With a token store (`moeworks twin serve --auth-file`) every route under /api and /metrics needs a
bearer token: viewer reads (state, history, alarms, the live feed); operator acknowledges alarms and
runs what-ifs; admin (every right) starts and aborts model rollouts (twin.api.routes.rollouts, with
`--rollout-key`) and is what routes that change configuration, the MES or ETL will ask for. The dashboard
page itself holds no data: it asks for a token and sends it with each request. Without a store the twin
serves loopback only (twin.auth.check_bind) and every caller is the local admin.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.security import HTTPBearer

from twin.api.deps import ApiContext
from twin.api.responses import refusals
from twin.api.routes import alarms, assets, dashboard, history, identity, ingest, mes, metrics, stream, whatif
from twin.api.routes import rollouts as rollout_routes
from twin.auth import TokenStore
from twin.rollout.manager import RolloutManager
from twin.service import TwinService


def create_app(service: TwinService, *, stream_max_s: float = 600.0, tokens: TokenStore | None = None,
               max_streams: int = 64, rollouts: RolloutManager | None = None) -> FastAPI:
    """`stream_max_s`: each live-update stream ends after this long; browsers reconnect on their own.
    `tokens`: require bearer tokens with roles (None: no authentication, for a loopback-only twin).
    `max_streams`: live streams open at once; more are refused with 503 (a wall of screens needs a few).
    `rollouts`: serve /api/rollouts and /api/edge-models (twin.api.routes.rollouts)."""
    app = FastAPI(title="moeworks digital twin", version="1",
                  description="Assets, live state, history, alarms and what-if simulation of a plant fed over "
                              "MQTT (Sparkplug-B-style topics, JSON payloads: see /api/schema)."
                              + (" Every route needs `Authorization: Bearer <token>` (`moeworks auth token`)."
                                 if tokens else ""))
    ctx = ApiContext.build(service, tokens)
    # HTTPBearer only documents the scheme in the OpenAPI schema (/docs gets its Authorize button);
    # the role checks decide. auto_error=False: its 403 for a missing header would hide our 401.
    protected = {"dependencies": [Depends(HTTPBearer(auto_error=False))] if tokens else [],
                 "responses": refusals(authenticated=tokens is not None)}
    app.include_router(dashboard.router())
    for resource in (identity, assets, history, alarms, whatif, ingest, mes, metrics):
        app.include_router(resource.router(ctx), **protected)
    app.include_router(stream.router(ctx, stream_max_s=stream_max_s, max_streams=max_streams), **protected)
    if rollouts is not None:
        app.include_router(rollout_routes.router(ctx, rollouts), **protected)
    return app
