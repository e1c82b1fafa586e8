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

from collections.abc import Mapping
from typing import Any, TypeAlias

from fse.core.registry.logits import (
    ENTROPY_SPEC,
    L2_NORM_SPEC,
    LOGIT_VARIANCE_SPEC,
    MAX_PROB_SPEC,
    PERPLEXITY_SPEC,
    EntropyGuard,
    L2NormGuard,
    LogitVarianceGuard,
    MaxProbGuard,
    PerplexityGuard,
)
from fse.core.registry.loops import (
    LOOP_SPEC,
    NEAR_LOOP_SPEC,
    LoopDetector,
    LoopGuard,
    NearLoopDetector,
    NearLoopGuard,
)
from fse.core.registry.prompt import PROMPT_PERPLEXITY_SPEC, PromptPerplexityGuard
from fse.core.registry.spec import (
    ALWAYS_ON,
    GuardSpec,
    Judge,
    Measure,
    MetricNaN,
    Plot,
    PolicyError,
    PromptJudge,
)
from fse.core.types import GuardName

__all__ = [
    "ALWAYS_ON",
    "GUARDS",
    "EntropyGuard",
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
    "NearLoopDetector",
    "NearLoopGuard",
    "PerplexityGuard",
    "Plot",
    "PolicyError",
    "PromptJudge",
    "PromptPerplexityGuard",
    "spec",
]


# In the order guards are rendered, documented and checked.
GUARDS: tuple[GuardSpec[Any], ...] = (
    PERPLEXITY_SPEC,
    L2_NORM_SPEC,
    LOGIT_VARIANCE_SPEC,
    MAX_PROB_SPEC,
    ENTROPY_SPEC,
    LOOP_SPEC,
    NEAR_LOOP_SPEC,
    PROMPT_PERPLEXITY_SPEC,
)

# The config types of GUARDS, for type checkers (a new guard adds its config here too).
GuardConfig: TypeAlias = (
    PerplexityGuard
    | L2NormGuard
    | LogitVarianceGuard
    | MaxProbGuard
    | EntropyGuard
    | LoopGuard
    | NearLoopGuard
    | PromptPerplexityGuard
)

_BY_NAME: Mapping[str, GuardSpec[Any]] = {s.name: s for s in GUARDS}


def spec(name: str) -> GuardSpec[Any]:
    """The entry of a guard by name; KeyError for a name that is not a configurable guard."""
    return _BY_NAME[name]


def names() -> tuple[GuardName, ...]:
    """The configurable guards' names, in registry order."""
    return tuple(s.name for s in GUARDS)
