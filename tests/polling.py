"""Polling for the tests: wait until something another thread or process does has happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 20.0, what: str = "condition", *,
             interval: float = 0.05) -> T:
    """Call `condition` every `interval` s until it returns something truthy, and return that.

    A falsy answer once `timeout` s have passed raises AssertionError naming `what` (raised, not asserted, so
    `python -O` cannot skip the failure).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
