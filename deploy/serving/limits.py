"""What a request may be, checked at the door: body size, JSON nesting and numbers, deadline.

The body is read with a byte limit (413 past it, before it is all in memory); its nesting depth is
measured before it is parsed (one pass over the structural bytes only); then orjson parses it in C
(no Python recursion: its own hard limit is 1,024 levels; a number that overflows a double, such as
an integer of 400 digits or 1e400, is a parse error, and NaN/Infinity are not JSON). Every refusal
is a `RequestRefused` carrying the HTTP status, the location and a one-line reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

# The bytes that can change the nesting depth or open and close a string (and every character a
# backslash may escape, so that an escaped quote stays escaped once the rest is dropped).
_STRUCTURE = frozenset(b'[]{}"\\/bfnrtu')
_DROP = bytes(sorted(set(range(256)) - _STRUCTURE))
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestRefused(ValueError):
    """A request refused at the door: `status` (413, 422), `loc` (field path), one-line `message`."""

    def __init__(self, status: int, loc: list[str | int], message: str, kind: str = "value_error") -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {message}")
        self.status, self.loc, self.message, self.kind = status, loc, message, kind


@dataclass
class RequestLimits:
    max_body_bytes: int = 16 << 20  # 16 MiB: 256 credit rows are ~0.5 MiB, one defects image a few MiB
    max_instances: int = 256  # rows one request may carry
    max_depth: int = 8  # body > instances > instance > field > 2-D array is 5 levels; 8 leaves room
    max_timeout_ms: float = 60_000.0  # a client may ask for a longer deadline than the default, not forever
    offload_bytes: int = 8 << 10  # bodies larger than this are parsed in a worker thread, off the event loop
    # Threads that parse: few, so that the event loop waits for the GIL behind at most these (with
    # anyio's 40 threads, /healthz p99 reached 0.5 s at 2x load: benchmarks/serving.py --overload).
    parse_threads: int = 2

    def __post_init__(self) -> None:
        if not 1024 <= self.max_body_bytes <= 1 << 30:
            raise ValueError("max_body_bytes must be between 1 KiB and 1 GiB")
        if not 1 <= self.max_instances <= 1_000_000:
            raise ValueError("max_instances must be between 1 and 1,000,000")
        if not 2 <= self.max_depth <= 64:
            raise ValueError("max_depth must be between 2 and 64")
        if not 0 < self.max_timeout_ms <= 3_600_000:
            raise ValueError("max_timeout_ms must be in (0, 3,600,000]")
        if self.offload_bytes < 0:
            raise ValueError("offload_bytes must be >= 0")
        if not 1 <= self.parse_threads <= 64:
            raise ValueError("parse_threads must be between 1 and 64")


def nesting_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count).

    Only the structural bytes are kept (a numeric body shrinks ~100x), strings are cut out of
    those, and the depth is a cumulative sum: ~10 ms for 20 MB of numbers.
    """
    kept = body.translate(None, _DROP)
    if b'"' in kept:
        kept = _STRING.sub(b"", kept)
    if not kept:
        return 0
    return int(np.cumsum(_STEP[np.frombuffer(kept, dtype=np.uint8)], dtype=np.int64).max(initial=0))


def parse_json(body: bytes, limits: RequestLimits) -> Any:
    """The body as JSON, refused (422) past `limits.max_depth` or when it is not JSON."""
    depth = nesting_depth(body)
    if depth > limits.max_depth:
        raise RequestRefused(422, ["body"], f"JSON nested {depth} levels deep; at most {limits.max_depth}",
                             "json_too_deep")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestRefused(422, ["body"], f"invalid JSON: {error}", "json_invalid") from None


def request_timeout_s(payload: dict, limits: RequestLimits) -> float | None:
    """`timeout_ms` of a request in seconds (None: the server's default), bounded."""
    value = payload.get("timeout_ms")
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or not 1 <= value <= limits.max_timeout_ms:
        raise RequestRefused(422, ["body", "timeout_ms"],
                             f"expected a number of milliseconds in [1, {limits.max_timeout_ms:g}]")
    return float(value) / 1000
