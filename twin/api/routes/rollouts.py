"""REST routes of model rollouts: start and abort (admin), status and each node's model (viewer), and the
bundle's files for the edge nodes (the download token their NCMD carried, or a viewer token).

Files are served with HTTP Range support (Starlette's FileResponse answers `Range: bytes=N-` with 206),
so an agent that lost its connection or was restarted resumes where its staging file ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from twin.api.deps import ApiContext
from twin.api.models.common import Problem
from twin.api.models.rollouts import EdgeModelOut, RolloutIn, RolloutOut
from twin.api.responses import BAD_BODY, UNPROCESSABLE
from twin.auth import Identity, bearer_token
from twin.rollout.manager import RolloutError, RolloutManager
from twin.rollout.protocol import HealthGate

RolloutId = Annotated[str, PathParam(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
FileName = Annotated[str, PathParam(max_length=64)]
NO_ROLLOUT = {404: {"model": Problem, "description": "No such rollout"}}


def router(ctx: ApiContext, manager: RolloutManager) -> APIRouter:
    viewer, admin, tokens = ctx.viewer, ctx.admin, ctx.tokens
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
