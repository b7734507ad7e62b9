"""Refusals the routes document in the OpenAPI schema, beside FastAPI's own."""

from __future__ import annotations

from twin.api.models.common import Problem

# a what-if or rollout the twin cannot run (no estimate yet, too large a plan, a bad bundle) is a 422 with a
# one-line detail, next to FastAPI's own 422 for a body that does not fit the schema
UNPROCESSABLE = {422: {"description": "The request does not fit the schema, or the twin cannot run it",
                       "content": {"application/json": {"schema": {"anyOf": [
                           {"$ref": "#/components/schemas/HTTPValidationError"},
                           {"$ref": "#/components/schemas/Problem"}]}}}}}
NOT_FOUND = {404: {"model": Problem, "description": "No such asset or alarm"}}
PROBLEM_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
BAD_BODY = {400: {"model": Problem, "description": "The body is not JSON"}}


def refusals(*, authenticated: bool) -> dict:
    """401 and 403 of every route behind a token (refusals are JSON on every route, /metrics' text and
    the event stream included)."""
    if not authenticated:
        return {}
    return {401: {"description": "No valid bearer token", "content": PROBLEM_JSON},
            403: {"description": "The token's role may not do this", "content": PROBLEM_JSON}}
