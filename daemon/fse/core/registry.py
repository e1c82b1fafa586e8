"""Every configurable guard, declared once.

A guard is one :class:`GuardSpec` in :data:`GUARDS`. The entry holds everything the rest
of the package needs to know about the guard:

- ``name``: the :class:`~fse.core.types.GuardName` a trip reports, which is also the
  policy table (``[guards.<name>]``) and the :class:`~fse.core.policy.Policy` field;
- ``config``: a frozen dataclass whose fields are the table's keys, whose defaults are
  the defaults, and whose ``__post_init__`` checks types and ranges (raising
  :class:`PolicyError` naming ``guards.<name>.<key>``), so a policy built in code is
  checked by the same rules as one read from a file;
- ``judge``: the factory that turns one config into the per-stream closure the
  :class:`~fse.core.guards.GuardChain` calls on every step (``None`` = pass, a
  :class:`~fse.core.types.Trip` = tripped; raise :class:`MetricNaN` on a NaN it must
  compare);
- ``measure``: what ``fse calibrate`` measures to set the guard's threshold;
- ``summary``, ``marker``, ``plot``: how ``fse experiment`` labels the guard in its
  report and draws it in its plots.

Policy parsing, the guard chain, calibrate and experiment all walk :data:`GUARDS`, in
its order (the order guards are rendered, documented and checked). ``non_finite`` is
not an entry: it is always on, halts, and has no keys (see fse.core.guards).
docs/guards.md says how to add a guard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeAlias, TypeVar

from fse._native import ffi, lib
from fse.core.types import (
    L2_NORM,
    LOGIT_VARIANCE,
    LOOP,
    MAX_PROB,
    NON_FINITE,
    PERPLEXITY,
    Action,
    GuardName,
    StepMetrics,
    Trip,
)
from fse.core.values import ValueRefused, check, choice

__all__ = [
    "ALWAYS_ON",
    "GUARDS",
    "GuardConfig",
    "GuardSpec",
    "Judge",
    "L2NormGuard",
    "LogitVarianceGuard",
    "LoopDetector",
    "LoopGuard",
    "MaxProbGuard",
    "Measure",
    "MetricNaN",
    "PerplexityGuard",
    "Plot",
    "PolicyError",
    "spec",
]

# The guard every policy has: not configurable, not in GUARDS.
ALWAYS_ON: GuardName = NON_FINITE

# One step's judgement: None when the step passes.
Judge: TypeAlias = Callable[[StepMetrics], "Trip | None"]


class PolicyError(ValueRefused):
    """An invalid policy. ``key`` is the dotted key at fault, when there is one."""


class MetricNaN(Exception):
    """A guard found NaN where it must compare: the chain reports it as ``internal``."""


# ---------------------------------------------------------------------------
# Checking a key's value (the config dataclasses below, and fse.core.policy), by the
# checks of fse.core.values, raising PolicyError


def check_float(key: str, value: object, ok: Callable[[float], bool], accepted: str) -> float:
    """A finite number for which ok() holds, as a float (an int is accepted, a bool not)."""
    number: float = check(key, value, float, ok, accepted, error=PolicyError)
    return number


def check_int(key: str, value: object, low: int, high: int, note: str = "") -> int:
    """An integer low <= value <= high (a float or a bool is not accepted)."""
    accepted = f"integer {low} <= value <= {high}{note}"
    number: int = check(key, value, int, lambda v: low <= v <= high, accepted, error=PolicyError)
    return number


def check_action(key: str, value: object) -> Action:
    return "halt" if choice(key, value, ("halt", "warn"), error=PolicyError) == "halt" else "warn"


def set_field(obj: object, name: str, value: object) -> None:
    # Frozen dataclasses normalise their own fields (int -> float) in __post_init__.
    object.__setattr__(obj, name, value)


def positive(x: float) -> bool:
    return x > 0


# ---------------------------------------------------------------------------
# What an entry declares


@dataclass(frozen=True, slots=True)
class Measure:
    """What ``fse calibrate`` measures to set one key of a guard.

    ``rule`` names how fse.tools.calibrate turns the healthy data into the key's value:
    ``"quantile"`` (the generic rule, for any per-step metric: the healthy p_q x margin
    for a high tail, p_(1-q) / margin for a low one, clamped to ``limit``) or one of the
    rules it defines for the guards that need more (``"windowed_ppl"``, ``"l2_vocab"``,
    ``"run_length"``, ``"loop_span"``).
    """

    key: str  # the config key calibrate sets
    metric: str  # the StepMetrics attribute measured
    tail: Literal["high", "low"]  # the side on which the guard trips
    limit: float | None = None  # the hard limit calibrate never loosens past
    rule: str = "quantile"


@dataclass(frozen=True, slots=True)
class Plot:
    """A panel of ``fse experiment``'s metrics.png: the metric the guard compares."""

    metric: str  # the StepMetrics attribute drawn
    label: str  # the panel's title
    scale: Literal["linear", "log"]
    halts_below: bool = False  # the halting side is below the threshold (shaded red)
    probability: bool = False  # a value in [0, 1]: the axis shows that whole range


C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class GuardSpec(Generic[C]):
    """One configurable guard (see the module docstring)."""

    name: GuardName
    config: type[C]
    judge: Callable[[C], Judge]
    summary: Callable[[C], str]  # the guard's settings in a phrase, e.g. "l2_norm 1e+04"
    measure: Measure | None = None  # None: calibrate keeps the base policy's setting
    marker: str = "*"  # matplotlib marker of its halts in the plots
    plot: Plot | None = None  # its panel in metrics.png, if it compares a step metric
    metric: str | None = None  # the StepMetrics attribute its trip's value is (if any)


# ---------------------------------------------------------------------------
# The shared judges


def _above(name: str, attr: str, threshold: float, action: Action, armed_at: int = 0) -> Judge:
    """Trips when getattr(m, attr) > threshold, from token index armed_at on."""

    def guard(m: StepMetrics) -> Trip | None:
        if m.index < armed_at:
            return None
        value: float = getattr(m, attr)
        if value <= threshold:  # the common case: one comparison
            return None
        if value != value:
            raise MetricNaN(name)
        return Trip(name, value, threshold, m.index, action)

    return guard


# ---------------------------------------------------------------------------
# perplexity


@dataclass(frozen=True, slots=True)
class PerplexityGuard:
    """Halt when the windowed perplexity exceeds threshold, once min_tokens are generated."""

    threshold: float = 400.0
    window: int = 16  # 0 = cumulative
    min_tokens: int = 4
    action: Action = "halt"

    def __post_init__(self) -> None:
        k = "guards.perplexity."
        set_field(
            self,
            "threshold",
            check_float(k + "threshold", self.threshold, lambda x: x > 1, "value > 1, finite"),
        )
        check_int(k + "window", self.window, 0, 4096, " (0 = cumulative)")
        check_int(k + "min_tokens", self.min_tokens, 1, 4096)
        check_action(k + "action", self.action)


def _perplexity(cfg: PerplexityGuard) -> Judge:
    return _above(PERPLEXITY, "ppl", cfg.threshold, cfg.action, armed_at=cfg.min_tokens - 1)


PERPLEXITY_SPEC = GuardSpec(
    PERPLEXITY,
    PerplexityGuard,
    _perplexity,
    summary=lambda c: f"perplexity {c.threshold:g} (window {c.window})",
    measure=Measure("threshold", "ppl", "high", limit=400.0, rule="windowed_ppl"),
    marker="X",
    metric="ppl",
)


# ---------------------------------------------------------------------------
# l2_norm


@dataclass(frozen=True, slots=True)
class L2NormGuard:
    """Halt when the L2 norm of the logits exceeds threshold (numerical instability)."""

    threshold: float = 1e4
    action: Action = "halt"

    def __post_init__(self) -> None:
        k = "guards.l2_norm."
        set_field(
            self,
            "threshold",
            check_float(k + "threshold", self.threshold, positive, "value > 0, finite"),
        )
        check_action(k + "action", self.action)


def _l2_norm(cfg: L2NormGuard) -> Judge:
    return _above(L2_NORM, "l2_norm", cfg.threshold, cfg.action)


L2_NORM_SPEC = GuardSpec(
    L2_NORM,
    L2NormGuard,
    _l2_norm,
    summary=lambda c: f"l2_norm {c.threshold:g}",
    measure=Measure("threshold", "l2_norm", "high", rule="l2_vocab"),
    marker="s",
    plot=Plot("l2_norm", "L2 norm of logits", "log"),
    metric="l2_norm",
)


# ---------------------------------------------------------------------------
# logit_variance


@dataclass(frozen=True, slots=True)
class LogitVarianceGuard:
    """Halt when the variance of the logits falls below threshold (model collapse)."""

    threshold: float = 0.1
    action: Action = "halt"

    def __post_init__(self) -> None:
        k = "guards.logit_variance."
        set_field(
            self,
            "threshold",
            check_float(k + "threshold", self.threshold, lambda x: x >= 0, "value >= 0, finite"),
        )
        check_action(k + "action", self.action)


def _logit_variance(cfg: LogitVarianceGuard) -> Judge:
    threshold, action = cfg.threshold, cfg.action

    def guard(m: StepMetrics) -> Trip | None:
        value = m.variance
        if value >= threshold:
            return None
        if value != value:
            raise MetricNaN(LOGIT_VARIANCE)
        return Trip(LOGIT_VARIANCE, value, threshold, m.index, action)

    return guard


LOGIT_VARIANCE_SPEC = GuardSpec(
    LOGIT_VARIANCE,
    LogitVarianceGuard,
    _logit_variance,
    summary=lambda c: f"logit_variance {c.threshold:g}",
    measure=Measure("threshold", "variance", "low", limit=0.1),
    marker="v",
    plot=Plot("variance", "logit variance", "log", halts_below=True),
    metric="variance",
)


# ---------------------------------------------------------------------------
# max_prob


@dataclass(frozen=True, slots=True)
class MaxProbGuard:
    """Halt when the top probability exceeds threshold for `consecutive` steps in a row."""

    threshold: float = 0.99
    consecutive: int = 8
    action: Action = "halt"

    def __post_init__(self) -> None:
        k = "guards.max_prob."
        set_field(
            self,
            "threshold",
            check_float(k + "threshold", self.threshold, lambda x: 0 < x <= 1, "0 < value <= 1"),
        )
        check_int(k + "consecutive", self.consecutive, 1, 4096)
        check_action(k + "action", self.action)


def _max_prob(cfg: MaxProbGuard) -> Judge:
    threshold, needed, action = cfg.threshold, cfg.consecutive, cfg.action
    run = 0  # steps in a row above threshold, this one included

    def guard(m: StepMetrics) -> Trip | None:
        nonlocal run
        value = m.max_prob
        if value <= threshold:
            run = 0
            return None
        if value != value:
            raise MetricNaN(MAX_PROB)
        run += 1
        if run < needed:
            return None
        return Trip(MAX_PROB, value, threshold, m.index, action)

    return guard


MAX_PROB_SPEC = GuardSpec(
    MAX_PROB,
    MaxProbGuard,
    _max_prob,
    summary=lambda c: f"max_prob {c.threshold:g} \u00d7 {c.consecutive}",
    measure=Measure("consecutive", "max_prob", "high", limit=32, rule="run_length"),
    marker="^",
    plot=Plot("max_prob", "max probability", "linear", probability=True),
    metric="max_prob",
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
# The registry

# In the order guards are rendered, documented and checked.
GUARDS: tuple[GuardSpec[Any], ...] = (
    PERPLEXITY_SPEC,
    L2_NORM_SPEC,
    LOGIT_VARIANCE_SPEC,
    MAX_PROB_SPEC,
    LOOP_SPEC,
)

# The config types of GUARDS, for type checkers (a new guard adds its config here too).
GuardConfig: TypeAlias = (
    PerplexityGuard | L2NormGuard | LogitVarianceGuard | MaxProbGuard | LoopGuard
)

_BY_NAME: Mapping[str, GuardSpec[Any]] = {s.name: s for s in GUARDS}


def spec(name: str) -> GuardSpec[Any]:
    """The entry of a guard by name; KeyError for a name that is not a configurable guard."""
    return _BY_NAME[name]


def names() -> tuple[GuardName, ...]:
    """The configurable guards' names, in registry order."""
    return tuple(s.name for s in GUARDS)
