"""The guard chain: judges every generated token before it is released.

The guards themselves (their keys and how each judges a step) are the entries of
fse.core.registry; the chain builds one closure per guard the policy turns on and
walks them. One :class:`GuardChain` per generation (the max_prob counter and the loop
detector are per-stream state). The engine calls :meth:`GuardChain.check` once per token with
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
from collections.abc import Sequence
from typing import Final

from fse.core.policy import Policy
from fse.core.registry import GUARDS, Judge, LoopDetector, MetricNaN, PromptJudge
from fse.core.types import INTERNAL, NON_FINITE, StepMetrics, Trip

__all__ = ["PASS", "GuardChain", "LoopDetector"]

# Returned by check() when the token passes: one shared object, no allocation.
PASS: Final[tuple[Trip, ...]] = ()

_isfinite = math.isfinite


def _is_warn(trip: Trip) -> bool:
    return trip.action != "halt"


class GuardChain:
    """The guards of one policy, with fresh per-stream state.

    ``fault_at`` is a debug-only hook for fail-closed tests: when ``m.index ==
    fault_at`` an extra guard (run last) raises RuntimeError inside the chain,
    which must come out as an ``internal`` halt. Never set it in production.
    """

    __slots__ = ("_guards", "_prompt_judges", "active", "policy")

    def __init__(self, policy: Policy, fault_at: int | None = None) -> None:
        self.policy = policy
        guards: list[Judge] = []
        prompt_judges: list[PromptJudge] = []
        active: list[str] = [NON_FINITE]
        # Built once, in registry order: check() then just walks a tuple of closures.
        for spec in GUARDS:
            cfg = getattr(policy, spec.name)
            if cfg is None:
                continue
            if spec.judge_prompt is not None:
                prompt_judges.append(spec.judge_prompt(cfg))
            elif spec.judge is not None:
                guards.append(spec.judge(cfg))
            active.append(spec.name)
        if fault_at is not None:
            guards.append(_fault_guard(fault_at))
        self._guards: tuple[Judge, ...] = tuple(guards)
        self._prompt_judges: tuple[PromptJudge, ...] = tuple(prompt_judges)
        self.active: tuple[str, ...] = tuple(active)

    @property
    def scores_prompt(self) -> bool:
        """Whether a guard judges the prompt: its nll must be measured during prefill."""
        return bool(self._prompt_judges)

    def check_prompt(self, nll: Sequence[float]) -> tuple[Trip, ...]:
        """Every trip of the prompt guards, halting trips first, from the nll of the
        prompt's tokens after the first; never raises (an error is an ``internal`` halt
        at token index 0, as anything that cannot be judged)."""
        try:
            found = [t for judge in self._prompt_judges if (t := judge(nll)) is not None]
        except Exception:
            return (Trip(INTERNAL, None, None, 0, "halt"),)
        found.sort(key=_is_warn)
        return tuple(found)

    def check(self, m: StepMetrics) -> tuple[Trip, ...]:
        """Every trip of this step, halting trips first; ``PASS`` (``()``) if none."""
        try:
            if m.non_finite:
                return (Trip(NON_FINITE, float(m.non_finite), 0.0, m.index, "halt"),)
            # The logits are finite, so these must be too: anything else is an engine
            # bug. (x != x is the cheap NaN test; ppl may be inf after exp overflow.)
            if not (_isfinite(m.nll) and _isfinite(m.l2_norm) and _isfinite(m.variance)):
                raise MetricNaN("non-finite metric with finite logits")
            if m.max_prob != m.max_prob or m.ppl != m.ppl or m.ppl_cumulative != m.ppl_cumulative:
                raise MetricNaN("NaN metric")
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


def _fault_guard(fault_at: int) -> Judge:
    def guard(m: StepMetrics) -> Trip | None:
        if m.index == fault_at:
            raise RuntimeError(f"injected guard fault at token {fault_at} (debug hook)")
        return None

    return guard
