"""Who the presented token belongs to (the dashboard asks before it shows what the role may do)."""

from __future__ import annotations

from fastapi import APIRouter

from twin.api.deps import ApiContext
from twin.api.models.common import Identity as IdentityOut
from twin.auth import Identity


def router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.get("/api/whoami", summary="Who the presented token belongs to, and its role", response_model=IdentityOut)
    def whoami(identity: Identity = ctx.viewer) -> dict:
        return {"name": identity.name, "role": identity.role, "authenticated": ctx.tokens is not None}

    return router
