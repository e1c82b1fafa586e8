"""Per-step metrics: what the engine measures and the guards judge."""

from __future__ import annotations

import math


class PerplexityWindow:
    """exp(mean nll) over the last `window` tokens (0 = all of them), in O(1) per token."""

    __slots__ = ("_count", "_next", "_ring", "_total", "_window_sum", "window")

    def __init__(self, window: int) -> None:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.window = window
        self._ring = [0.0] * window
        self._next = 0
        self._count = 0
        self._window_sum = 0.0
        self._total = 0.0

    def push(self, nll: float) -> tuple[float, float]:
        """Add one token's nll; return (windowed, cumulative) perplexity."""
        self._count += 1
        self._total += nll
        if self.window == 0:
            cumulative = _exp(self._total / self._count)
            return cumulative, cumulative
        self._window_sum += nll - self._ring[self._next]
        self._ring[self._next] = nll
        self._next = (self._next + 1) % self.window
        if self._next == 0:
            # Re-sum once per lap so floating-point drift never accumulates.
            self._window_sum = math.fsum(self._ring)
        n = min(self._count, self.window)
        return _exp(self._window_sum / n), _exp(self._total / self._count)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
