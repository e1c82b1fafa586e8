"""Polling instead of fixed sleeps: wait for a condition, bounded by a liveness limit."""

from __future__ import annotations

import time
from collections.abc import Callable

# Liveness bound for anything that must happen at all (never a performance claim).
LIVE = 60.0


def wait_for(predicate: Callable[[], bool], what: str = "", timeout: float = LIVE) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def eventually(check: Callable[[], bool], seconds: float) -> bool:
    """Whether `check` holds within `seconds` (polled; the caller asserts)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
