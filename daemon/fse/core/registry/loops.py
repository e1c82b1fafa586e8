"""Guards on the sequence of tokens: the tail-cycle loop detector (native/fse_loop.c) and
the approximate one (native/fse_near_loop.c)."""

from __future__ import annotations

from dataclasses import dataclass

from fse._native import ffi, lib
from fse.core.registry.spec import (
    GuardSpec,
    Judge,
    Measure,
    check_action,
    check_float,
    check_int,
    set_field,
)
from fse.core.types import (
    LOOP,
    NEAR_LOOP,
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


# ---------------------------------------------------------------------------
# near_loop


@dataclass(frozen=True, slots=True)
class NearLoopGuard:
    """Halt when the tail of the output is a cycle up to a few tokens per copy: a counter,
    a timestamp, a renumbered item (see fse.h, ``fse_near_loop``)."""

    max_period: int = 256
    min_copies: int = 3
    min_span: int = 24
    min_match: float = 0.85
    action: Action = "halt"

    def __post_init__(self) -> None:
        k = "guards.near_loop."
        check_int(k + "max_period", self.max_period, 1, 4096)
        check_int(k + "min_copies", self.min_copies, 2, 1000)
        check_int(k + "min_span", self.min_span, 2, 65536)
        set_field(
            self,
            "min_match",
            check_float(k + "min_match", self.min_match, lambda x: 0 < x <= 1, "0 < value <= 1"),
        )
        check_action(k + "action", self.action)


class NearLoopDetector:
    """Token-level wrapper around the C approximate tail-cycle detector (``fse_near_loop``
    in fse.h). One per stream: a new stream gets a new detector."""

    __slots__ = ("_handle", "_match", "max_period", "min_copies", "min_match", "min_span")

    def __init__(self, max_period: int, min_copies: int, min_span: int, min_match: float) -> None:
        if not (
            1 <= max_period <= 4096
            and 2 <= min_copies <= 1000
            and 2 <= min_span <= 65536
            and 0 < min_match <= 1
        ):
            raise ValueError(
                f"NearLoopDetector({max_period}, {min_copies}, {min_span}, {min_match}): need "
                "max_period 1..4096, min_copies 2..1000, min_span 2..65536, 0 < min_match <= 1"
            )
        handle = lib.fse_near_loop_new(max_period, min_copies, min_span, min_match)
        if handle == ffi.NULL:
            raise MemoryError(
                f"fse_near_loop_new({max_period}, {min_copies}, {min_span}, {min_match}) failed"
            )
        # The ring (twice the longest span) and three arrays of int32: tells the GC what
        # the C side holds.
        ring = max(min_copies * max_period, min_span) + 1
        self._handle = ffi.gc(handle, lib.fse_near_loop_free, size=4 * (2 * ring + 3 * max_period))
        self._match = ffi.new("double *")  # reused out-param: no allocation per push
        self.max_period = max_period
        self.min_copies = min_copies
        self.min_span = min_span
        self.min_match = min_match

    def push(self, token: int) -> tuple[int, float]:
        """Append a token; return (period, match fraction) of the near loop it completes,
        or (0, 0.0)."""
        period: int = lib.fse_near_loop_push(self._handle, token, self._match)
        return (period, float(self._match[0])) if period else (0, 0.0)

    def best(self) -> tuple[int, float]:
        """The period with the highest match fraction among those whose window is full,
        and that fraction, whatever min_match is; (0, 0.0) before any window is full."""
        period: int = lib.fse_near_loop_best(self._handle, self._match)
        return (period, float(self._match[0])) if period else (0, 0.0)


def _near_loop(cfg: NearLoopGuard) -> Judge:
    detector = NearLoopDetector(cfg.max_period, cfg.min_copies, cfg.min_span, cfg.min_match)
    # Call the C function directly (not detector.push) to skip a call and a tuple.
    push, handle, match = lib.fse_near_loop_push, detector._handle, detector._match
    threshold, action = cfg.min_match, cfg.action

    def guard(m: StepMetrics) -> Trip | None:
        period: int = push(handle, m.token, match)
        if not period:
            return None
        # The verdict has one value (the match fraction); the period goes in its message.
        return Trip(NEAR_LOOP, match[0], threshold, m.index, action, f"period {period} tokens")

    return guard  # the closure holds handle and match, which keep the C objects alive


NEAR_LOOP_SPEC = GuardSpec(
    NEAR_LOOP,
    NearLoopGuard,
    _near_loop,
    summary=lambda c: (
        f"near_loop {c.min_match:g} match / {c.min_copies} copies / {c.min_span} tokens"
    ),
    measure=Measure("min_match", "token", "high", limit=0.95, rule="near_loop_match"),
    marker="D",
)
