"""What a registry entry declares (GuardSpec, Measure, Plot), how a guard's keys are
checked, and the judge the threshold guards share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeAlias, TypeVar

from fse.core.types import (
    NON_FINITE,
    Action,
    GuardName,
    StepMetrics,
    Trip,
)
from fse.core.values import ValueRefused, check, choice

# The guard every policy has: not configurable, not in GUARDS.
ALWAYS_ON: GuardName = NON_FINITE

# One step's judgement: None when the step passes.
Judge: TypeAlias = Callable[[StepMetrics], "Trip | None"]
# A prompt's judgement, once after prefill, from the nll of its tokens after the first.
PromptJudge: TypeAlias = Callable[[Sequence[float]], "Trip | None"]


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
    ``"run_length"``, ``"loop_span"``, ``"prompt_ppl"``).
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
    judge: Callable[[C], Judge] | None  # None: a prompt guard (judge_prompt)
    summary: Callable[[C], str]  # the guard's settings in a phrase, e.g. "l2_norm 1e+04"
    measure: Measure | None = None  # None: calibrate keeps the base policy's setting
    marker: str = "*"  # matplotlib marker of its halts in the plots
    plot: Plot | None = None  # its panel in metrics.png, if it compares a step metric
    metric: str | None = None  # the StepMetrics attribute its trip's value is (if any)
    # A guard judged once, on the prompt, after prefill (then `judge` is None): its
    # streams have their prompt scored during prefill.
    judge_prompt: Callable[[C], PromptJudge] | None = None


# ---------------------------------------------------------------------------
# The shared judges


def above(name: str, attr: str, threshold: float, action: Action, armed_at: int = 0) -> Judge:
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
