"""The live dashboard page (/). It holds no data: it asks for a token and sends it with each request."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

DASHBOARD = Path(__file__).parent.parent / "dashboard.html"


def router() -> APIRouter:
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return DASHBOARD.read_text()

    return router
