"""REST routes of model rollouts: start and abort (admin), status and each node's model (viewer), and the
bundle's files for the edge nodes (the download token their NCMD carried, or a viewer token).

Files are served with HTTP Range support (Starlette's FileResponse answers `Range: bytes=N-` with 206),
so an agent that lost its connection or was restarted resumes where its staging file ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from twin.api.app import BAD_BODY, UNPROCESSABLE
from twin.api.models import Problem
from twin.auth import Identity, TokenStore, bearer_token, role_dependency
from twin.rollout.manager import MAX_TARGETS, RolloutError, RolloutManager
from twin.rollout.protocol import HealthGate

RolloutId = Annotated[str, PathParam(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
FileName = Annotated[str, PathParam(max_length=64)]


class GateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int = Field(HealthGate.rows, ge=1, le=100_000, description="rows the new model scores under watch")
    max_drift: float = Field(HealthGate.max_drift, ge=0, le=1,
                             description="mean |p_new - p_previous| of the failure probability over the window")
    max_error_rate: float = Field(HealthGate.max_error_rate, ge=0, le=1)
    max_latency_ms: float = Field(HealthGate.max_latency_ms, ge=0, le=60_000,
                                  description="p95 scoring time (CPU ms a row)")


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(..., min_length=1, max_length=4096, description="the signed bundle's folder on the twin's host")
    nodes: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(..., min_length=1,
                                                                              max_length=MAX_TARGETS)
    canary: float = Field(0.1, gt=0, le=1, description="share of the nodes that take the model first")
    gate: GateIn = GateIn()


class GateOut(BaseModel):
    rows: int
    max_drift: float
    max_error_rate: float
    max_latency_ms: float


class RolloutNodeOut(BaseModel):
    node: str
    wave: Literal["canary", "rest"]
    state: str = Field(..., description="pending, offered, downloading, verifying, active, healthy, refused, "
                                        "rolled_back, aborted, skipped or timeout")
    reason: str | None
    version: str | None = Field(..., description="the node's active model, as it last reported")
    offered_ms: int | None
    sent_ms: int | None
    updated_ms: int


class RolloutOut(BaseModel):
    id: str
    created_ms: int
    created_by: str
    version: str
    sha256: str = Field(..., description="SHA-256 of the bundle's manifest.json")
    bytes: int
    canary_share: float
    gate: GateOut
    state: Literal["canary", "rolling", "completed", "partial", "failed", "aborted"]
    reason: str | None
    updated_ms: int
    counts: dict[str, int]
    nodes: list[RolloutNodeOut]


class EdgeModelOut(BaseModel):
    node: str
    online: bool
    model_version: str | None
    previous_version: str | None
    rollout_id: str | None
    rollout_state: str | None
    rollout_reason: str | None


NO_ROLLOUT = {404: {"model": Problem, "description": "No such rollout"}}


def rollout_router(manager: RolloutManager, tokens: TokenStore | None) -> APIRouter:
    viewer = Depends(role_dependency(tokens, "viewer"))
    admin = Depends(role_dependency(tokens, "admin"))
    router = APIRouter(tags=["rollouts"])

    def found(status: dict | None, rollout_id: str) -> dict:
        if status is None:
            raise HTTPException(404, f"no rollout {rollout_id!r}")
        return status

    @router.post("/api/rollouts", status_code=201, summary="Start a rollout of a signed bundle (admin)",
                 response_model=RolloutOut, responses=UNPROCESSABLE | BAD_BODY)
    def start(body: RolloutIn, identity: Identity = admin) -> dict:
        try:
            return manager.start(bundle=Path(body.bundle), nodes=body.nodes, canary_share=body.canary,
                                 gate=HealthGate(**body.gate.model_dump()), created_by=identity.name)
        except RolloutError as error:
            raise HTTPException(422, str(error)) from None

    @router.get("/api/rollouts", summary="Rollouts, newest first, with each node's state",
                response_model=list[RolloutOut])
    def rollouts(_: Identity = viewer) -> list[dict]:
        return manager.list()

    @router.get("/api/rollouts/{rollout_id}", summary="One rollout with each node's state",
                response_model=RolloutOut, responses=NO_ROLLOUT)
    def status(rollout_id: RolloutId, _: Identity = viewer) -> dict:
        return found(manager.status(rollout_id), rollout_id)

    @router.post("/api/rollouts/{rollout_id}/abort", summary="Stop a running rollout (admin)",
                 response_model=RolloutOut,
                 responses=NO_ROLLOUT | {409: {"model": Problem, "description": "The rollout is not running"}})
    def abort(rollout_id: RolloutId, identity: Identity = admin) -> dict:
        try:
            return found(manager.abort(rollout_id, by=identity.name), rollout_id)
        except RolloutError as error:
            raise HTTPException(409, str(error)) from None

    @router.get("/api/edge-models", summary="Each edge node's active model and latest rollout step",
                response_model=list[EdgeModelOut])
    def edge_models(_: Identity = viewer) -> list[dict]:
        return manager.edge_models()

    @router.get("/api/rollouts/{rollout_id}/files/{name}", summary="A file of the rollout's bundle (Range requests)",
                response_class=FileResponse, responses={
                    200: {"content": {"application/octet-stream": {}}, "description": "The file"},
                    206: {"content": {"application/octet-stream": {}}, "description": "The requested range"},
                    401: {"model": Problem, "description": "No valid download or bearer token"},
                    404: {"model": Problem, "description": "No such file in a running rollout"},
                    416: {"description": "The range lies beyond the file"}})
    def bundle_file(rollout_id: RolloutId, name: FileName, request: Request) -> FileResponse:
        token = bearer_token(request.headers.get("authorization"))
        if not manager.token_allows(rollout_id, token) and tokens is not None:
            identity = tokens.identify(token)
            if identity is None:
                raise HTTPException(401, "a download token or a valid bearer token is required",
                                    headers={"WWW-Authenticate": "Bearer"})
        path = manager.bundle_file(rollout_id, name)
        if path is None or not path.is_file():
            raise HTTPException(404, f"no file {name!r} in rollout {rollout_id!r}")
        return FileResponse(path, media_type="application/octet-stream")

    return router
