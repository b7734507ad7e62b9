"""The twin's counters in Prometheus' text format (viewer)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from twin.api.deps import ApiContext
from twin.auth import Identity


def router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    service = ctx.service

    @router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
    def metrics(_: Identity = ctx.viewer) -> str:
        s = service.stats()
        lines = [f'moeworks_twin_messages_total{{outcome="{k}"}} {v}' for k, v in sorted(s["counters"].items())]
        lines += [f"moeworks_twin_devices {s['devices']}", f"moeworks_twin_devices_online {s['online']}",
                  f"moeworks_twin_history_rows_total {s['committed']}",
                  f"moeworks_twin_write_errors_total {s['write_errors']}",
                  f"moeworks_twin_rows_refused_total {s['rows_refused']}",   # rows the database refused
                  f"moeworks_twin_health_backlog {s['health_backlog']}",     # scorings queued for the models
                  f"moeworks_twin_work_orders_pending {s['work_orders_pending']}"]
        for q in ("p50", "p99"):
            if s["latency_ms"][q] is not None:
                lines.append(f'moeworks_twin_latency_ms{{quantile="{q}"}} {s["latency_ms"][q]:.3f}')
        return "\n".join(lines) + "\n"

    return router
