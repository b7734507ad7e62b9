"""What every router of the twin's API is built with: the service, the role checks, the asset lookup
and the bounded path parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException
from fastapi import Path as PathParam

from twin.api.models.common import ID_MAX_LEN
from twin.auth import TokenStore, role_dependency
from twin.service import TwinService

DeviceId = Annotated[str, PathParam(max_length=ID_MAX_LEN)]
AlarmId = Annotated[str, PathParam(max_length=ID_MAX_LEN)]


@dataclass(frozen=True, kw_only=True)
class ApiContext:
    """`tokens`: None serves without authentication (a loopback-only twin: every caller is the local admin).
    `viewer`, `operator`, `admin`: route parameter defaults that resolve to the caller's Identity, or refuse it."""
    service: TwinService
    tokens: TokenStore | None
    viewer: Any
    operator: Any
    admin: Any

    @classmethod
    def build(cls, service: TwinService, tokens: TokenStore | None) -> ApiContext:
        return cls(service=service, tokens=tokens, viewer=Depends(role_dependency(tokens, "viewer")),
                   operator=Depends(role_dependency(tokens, "operator")),
                   admin=Depends(role_dependency(tokens, "admin")))

    def asset_or_404(self, device_id: str) -> dict:
        asset = self.service.asset(device_id)
        if asset is None:
            raise HTTPException(404, f"unknown asset {device_id[:ID_MAX_LEN]!r}")
        return asset
