"""Guards on the statistics of one step's logits: perplexity, L2 norm, logit variance,
maximum probability, entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fse.core.registry.spec import (
    GuardSpec,
    Judge,
    Measure,
    MetricNaN,
    Plot,
    above,
    check_action,
    check_float,
    check_int,
    positive,
    set_field,
)
from fse.core.types import (
    ENTROPY,
    L2_NORM,
    LOGIT_VARIANCE,
    MAX_PROB,
    PERPLEXITY,
    Action,
    StepMetrics,
    Trip,
)

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
    return above(PERPLEXITY, "ppl", cfg.threshold, cfg.action, armed_at=cfg.min_tokens - 1)


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
    return above(L2_NORM, "l2_norm", cfg.threshold, cfg.action)


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
# entropy


@dataclass(frozen=True, slots=True)
class EntropyGuard:
    """Halt when the mean entropy of the next-token distribution over the last `window`
    tokens exceeds threshold (nats), once min_tokens are generated: the model no longer
    knows what comes next (noise, confusion)."""

    threshold: float = 6.0
    window: int = 16
    min_tokens: int = 4
    action: Action = "halt"

    def __post_init__(self) -> None:
        k = "guards.entropy."
        set_field(
            self,
            "threshold",
            check_float(k + "threshold", self.threshold, lambda x: 0 < x <= 20, "0 < nats <= 20"),
        )
        check_int(k + "window", self.window, 1, 4096)
        check_int(k + "min_tokens", self.min_tokens, 1, 4096)
        check_action(k + "action", self.action)


def _entropy(cfg: EntropyGuard) -> Judge:
    threshold, window, armed_at, action = cfg.threshold, cfg.window, cfg.min_tokens - 1, cfg.action
    ring = [0.0] * window  # the last `window` entropies; a running sum over them
    total, count = 0.0, 0

    def guard(m: StepMetrics) -> Trip | None:
        nonlocal total, count
        value = m.entropy
        if value != value:
            raise MetricNaN(ENTROPY)
        slot = count % window
        total += value - ring[slot]
        ring[slot] = value
        count += 1
        if slot == window - 1:
            total = math.fsum(ring)  # once per lap: no drift
        mean = total / min(count, window)
        if m.index < armed_at or mean <= threshold:
            return None
        return Trip(ENTROPY, mean, threshold, m.index, action)

    return guard


ENTROPY_SPEC = GuardSpec(
    ENTROPY,
    EntropyGuard,
    _entropy,
    summary=lambda c: f"entropy {c.threshold:g} nats (window {c.window})",
    measure=Measure("threshold", "entropy", "high", limit=12.0),
    marker="D",
    plot=Plot("entropy", "entropy (nats)", "linear"),
    metric="entropy",
)
