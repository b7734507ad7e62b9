"""The plant model and its assets: live state and health (viewer)."""

from __future__ import annotations

from fastapi import APIRouter

from twin.api.deps import ApiContext, DeviceId
from twin.api.models.assets import AssetDetailOut, AssetOut, PlantOut
from twin.api.responses import NOT_FOUND
from twin.auth import Identity


def router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    service = ctx.service

    @router.get("/api/plant", summary="The plant model: site, lines and their machines", response_model=PlantOut)
    def plant(_: Identity = ctx.viewer) -> dict:
        return service.plant.to_dict()

    @router.get("/api/assets", summary="Every asset with its live state and health", response_model=list[AssetOut])
    def assets(_: Identity = ctx.viewer) -> list[dict]:
        return service.assets()

    @router.get("/api/assets/{device_id}", summary="One asset: state, health, sensors with units and limits",
                response_model=AssetDetailOut, responses=NOT_FOUND)
    def asset(device_id: DeviceId, _: Identity = ctx.viewer) -> dict:
        return ctx.asset_or_404(device_id)

    return router
