"""Bounds every route shares, the error body, and who the caller is."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_MS = 2**62          # timestamps (ms since the epoch) the API accepts: far beyond any real date, inside BIGINT
MAX_SEED = 2**53 - 1    # the largest integer every JSON reader keeps exact (a float beyond it rounds: 2**63 ~ 9.2e18)
ID_MAX_LEN = 128        # asset, alarm and device ids (the plant's ids are short words)


class Problem(BaseModel):
    """An error: what was wrong with the request, in one line."""
    detail: str


class Identity(BaseModel):
    name: str
    role: Literal["viewer", "operator", "admin"]
    authenticated: bool = Field(description="false when the twin runs without --auth-file (loopback only)")
