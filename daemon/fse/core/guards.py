"""The guard chain: judges every generated token before it is released.

One :class:`GuardChain` per generation (the max_prob counter and the loop detector
are per-stream state). The engine calls :meth:`GuardChain.check` once per token with
that step's :class:`~fse.core.metrics.StepMetrics`, halts on the first returned trip
whose action is ``"halt"``, and withholds the token that tripped it.

Fail-closed rules implemented here:

- ``non_finite`` is always on and checked first. When the logits hold NaN/Inf the
  chain returns that single halting trip and skips the other guards: the stream
  halts anyway, and their inputs may be meaningless.
- A guard that raises, a NaN metric (nll, ppl, ppl_cumulative, variance, max_prob,
  l2_norm) or an infinite nll/variance/l2_norm while ``non_finite == 0`` (the
  engine measured something impossible) yields exactly one halting ``internal``
  trip, replacing any other trips of that step. ``check`` never raises.
  (An infinite ``ppl`` is legitimate: exp overflow of a huge mean nll.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

from fse._native import ffi, lib
from fse.core.policy import LoopGuard, MaxProbGuard, Policy
from fse.core.types import (
    INTERNAL,
    L2_NORM,
    LOGIT_VARIANCE,
    LOOP,
    MAX_PROB,
    NON_FINITE,
    PERPLEXITY,
    Action,
    StepMetrics,
    Trip,
)

__all__ = ["PASS", "GuardChain", "LoopDetector"]

# Returned by check() when the token passes: one shared object, no allocation.
PASS: Final[tuple[Trip, ...]] = ()

_Guard = Callable[[StepMetrics], "Trip | None"]
_isfinite = math.isfinite


class _MetricNaN(Exception):
    """A guard found NaN where it must compare: reported as ``internal``."""


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


def _is_warn(trip: Trip) -> bool:
    return trip.action != "halt"


class GuardChain:
    """The guards of one policy, with fresh per-stream state.

    ``fault_at`` is a debug-only hook for fail-closed tests: when ``m.index ==
    fault_at`` an extra guard (run last) raises RuntimeError inside the chain,
    which must come out as an ``internal`` halt. Never set it in production.
    """

    __slots__ = ("_guards", "active", "policy")

    def __init__(self, policy: Policy, fault_at: int | None = None) -> None:
        self.policy = policy
        guards: list[_Guard] = []
        active: list[str] = [NON_FINITE]
        # Built once: check() then just walks a list of closures.
        if policy.perplexity is not None:
            guards.append(
                _above(
                    PERPLEXITY,
                    "ppl",
                    policy.perplexity.threshold,
                    policy.perplexity.action,
                    armed_at=policy.perplexity.min_tokens - 1,
                )
            )
            active.append(PERPLEXITY)
        if policy.l2_norm is not None:
            guards.append(
                _above(L2_NORM, "l2_norm", policy.l2_norm.threshold, policy.l2_norm.action)
            )
            active.append(L2_NORM)
        if policy.logit_variance is not None:
            guards.append(
                _variance_guard(policy.logit_variance.threshold, policy.logit_variance.action)
            )
            active.append(LOGIT_VARIANCE)
        if policy.max_prob is not None:
            guards.append(_max_prob_guard(policy.max_prob))
            active.append(MAX_PROB)
        if policy.loop is not None:
            guards.append(_loop_guard(policy.loop))
            active.append(LOOP)
        if fault_at is not None:
            guards.append(_fault_guard(fault_at))
        self._guards: tuple[_Guard, ...] = tuple(guards)
        self.active: tuple[str, ...] = tuple(active)

    def check(self, m: StepMetrics) -> tuple[Trip, ...]:
        """Every trip of this step, halting trips first; ``PASS`` (``()``) if none."""
        try:
            if m.non_finite:
                return (Trip(NON_FINITE, float(m.non_finite), 0.0, m.index, "halt"),)
            # The logits are finite, so these must be too: anything else is an engine
            # bug. (x != x is the cheap NaN test; ppl may be inf after exp overflow.)
            if not (_isfinite(m.nll) and _isfinite(m.l2_norm) and _isfinite(m.variance)):
                raise _MetricNaN("non-finite metric with finite logits")
            if m.max_prob != m.max_prob or m.ppl != m.ppl or m.ppl_cumulative != m.ppl_cumulative:
                raise _MetricNaN("NaN metric")
            found: list[Trip] | None = None
            for guard in self._guards:
                trip = guard(m)
                if trip is not None:
                    if found is None:
                        found = [trip]
                    else:
                        found.append(trip)
            if found is None:
                return PASS
            if len(found) > 1:
                found.sort(key=_is_warn)  # stable: halts first, guard order kept
            return tuple(found)
        except Exception:  # fail closed: whatever went wrong, this token is not released
            return (Trip(INTERNAL, None, None, _index_of(m), "halt"),)


def _index_of(m: object) -> int:
    index = getattr(m, "index", -1)
    return index if isinstance(index, int) else -1


def _above(name: str, attr: str, threshold: float, action: Action, armed_at: int = 0) -> _Guard:
    """Trips when getattr(m, attr) > threshold, from token index armed_at on."""

    def guard(m: StepMetrics) -> Trip | None:
        if m.index < armed_at:
            return None
        value: float = getattr(m, attr)
        if value <= threshold:  # the common case: one comparison
            return None
        if value != value:
            raise _MetricNaN(name)
        return Trip(name, value, threshold, m.index, action)

    return guard


def _variance_guard(threshold: float, action: Action) -> _Guard:
    def guard(m: StepMetrics) -> Trip | None:
        value = m.variance
        if value >= threshold:
            return None
        if value != value:
            raise _MetricNaN(LOGIT_VARIANCE)
        return Trip(LOGIT_VARIANCE, value, threshold, m.index, action)

    return guard


def _max_prob_guard(cfg: MaxProbGuard) -> _Guard:
    threshold, needed, action = cfg.threshold, cfg.consecutive, cfg.action
    run = 0  # steps in a row above threshold, this one included

    def guard(m: StepMetrics) -> Trip | None:
        nonlocal run
        value = m.max_prob
        if value <= threshold:
            run = 0
            return None
        if value != value:
            raise _MetricNaN(MAX_PROB)
        run += 1
        if run < needed:
            return None
        return Trip(MAX_PROB, value, threshold, m.index, action)

    return guard


def _loop_guard(cfg: LoopGuard) -> _Guard:
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


def _fault_guard(fault_at: int) -> _Guard:
    def guard(m: StepMetrics) -> Trip | None:
        if m.index == fault_at:
            raise RuntimeError(f"injected guard fault at token {fault_at} (debug hook)")
        return None

    return guard
