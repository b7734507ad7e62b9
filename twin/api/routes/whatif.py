"""What-if simulations of one asset under a changed plan (operator)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from twin.api.deps import ApiContext, DeviceId
from twin.api.models.whatif import EnginePlanIn, EngineResult, MillPlanIn, MillResult
from twin.api.responses import BAD_BODY, NOT_FOUND, UNPROCESSABLE
from twin.auth import Identity
from twin.domain.whatif import EnginePlan, MillPlan, SimulationError


def router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    service = ctx.service

    def simulate(device_id: str, plan_type: type[MillPlan | EnginePlan], plan: BaseModel) -> dict:
        """The validated body `plan` run as the domain's `plan_type`; a plan the asset cannot run answers 422."""
        ctx.asset_or_404(device_id)
        try:
            return service.simulate(device_id, plan_type(**plan.model_dump()))
        except SimulationError as exc:
            raise HTTPException(422, str(exc)) from None

    @router.post("/api/assets/{device_id}/simulate/mill", summary="What-if Monte Carlo for a mill (operator)",
                 response_model=MillResult, responses=NOT_FOUND | UNPROCESSABLE | BAD_BODY)
    def simulate_mill(device_id: DeviceId, plan: MillPlanIn, _: Identity = ctx.operator) -> dict:
        return simulate(device_id, MillPlan, plan)

    @router.post("/api/assets/{device_id}/simulate/engine", summary="What-if RUL projection for an engine (operator)",
                 response_model=EngineResult, responses=NOT_FOUND | UNPROCESSABLE | BAD_BODY)
    def simulate_engine(device_id: DeviceId, plan: EnginePlanIn, _: Identity = ctx.operator) -> dict:
        return simulate(device_id, EnginePlan, plan)

    return router
