"""Guards on the sequence of tokens: the tail-cycle loop detector (native/fse_loop.c)."""

from __future__ import annotations

from dataclasses import dataclass

from fse._native import ffi, lib
from fse.core.registry.spec import (
    GuardSpec,
    Judge,
    Measure,
    check_action,
    check_int,
)
from fse.core.types import (
    LOOP,
    Action,
    StepMetrics,
    Trip,
)

# ---------------------------------------------------------------------------
# loop


@dataclass(frozen=True, slots=True)
class LoopGuard:
    """Halt when the tail of the output is a cycle (see fse.h, ``fse_loop``)."""

    max_period: int = 1024
    min_repeats: int = 3
    min_span: int = 12
    action: Action = "halt"

    def __post_init__(self) -> None:
        k = "guards.loop."
        check_int(k + "max_period", self.max_period, 1, 4096)
        check_int(k + "min_repeats", self.min_repeats, 2, 1000)
        check_int(k + "min_span", self.min_span, 2, 65536)
        check_action(k + "action", self.action)


class LoopDetector:
    """Token-level wrapper around the C tail-cycle detector (``fse_loop`` in fse.h)."""

    __slots__ = ("_handle", "_span", "max_period", "min_repeats", "min_span")

    def __init__(self, max_period: int, min_repeats: int, min_span: int) -> None:
        if max_period < 1 or min_repeats < 2 or min_span < 2:
            raise ValueError(
                f"LoopDetector({max_period}, {min_repeats}, {min_span}): need "
                "max_period >= 1, min_repeats >= 2, min_span >= 2"
            )
        handle = lib.fse_loop_new(max_period, min_repeats, min_span)
        if handle == ffi.NULL:
            raise MemoryError(f"fse_loop_new({max_period}, {min_repeats}, {min_span}) failed")
        # history (2x) + run arrays of int32: tells the GC what the C side holds.
        self._handle = ffi.gc(handle, lib.fse_loop_free, size=12 * (max_period + 1))
        self._span = ffi.new("int32_t *")  # reused out-param: no allocation per push
        self.max_period = max_period
        self.min_repeats = min_repeats
        self.min_span = min_span

    def push(self, token: int) -> tuple[int, int]:
        """Append a token; return (period, span) of the loop it completes, or (0, 0)."""
        period: int = lib.fse_loop_push(self._handle, token, self._span)
        return (period, int(self._span[0])) if period else (0, 0)


def _loop(cfg: LoopGuard) -> Judge:
    detector = LoopDetector(cfg.max_period, cfg.min_repeats, cfg.min_span)
    # Call the C function directly (not detector.push) to skip a call and a tuple.
    push, handle, span = lib.fse_loop_push, detector._handle, detector._span
    threshold, action = float(cfg.min_repeats), cfg.action

    def guard(m: StepMetrics) -> Trip | None:
        period: int = push(handle, m.token, span)
        if not period:
            return None
        return Trip(LOOP, span[0] / period, threshold, m.index, action)

    return guard  # the closure holds handle and span, which keep the C objects alive


LOOP_SPEC = GuardSpec(
    LOOP,
    LoopGuard,
    _loop,
    summary=lambda c: f"loop {c.min_repeats} repeats / {c.min_span} tokens",
    measure=Measure("min_span", "token", "high", limit=32, rule="loop_span"),
    marker="o",
)
