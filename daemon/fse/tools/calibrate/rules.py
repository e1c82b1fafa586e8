"""From healthy data to a policy: one rule per guard `measure` (fse.core.registry),
the hard limits, and the expected false-halt rate (docs/calibration.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fse.core.registry import GUARDS, GuardSpec, LoopGuard, spec
from fse.core.registry.loops import NearLoopDetector
from fse.core.registry.prompt import prompt_perplexities
from fse.core.types import LOGIT_VARIANCE, LOOP, MAX_PROB, PERPLEXITY, PROMPT_PERPLEXITY
from fse.tools.calibrate.stats import (
    fmt,
    longest_streak,
    loop_span,
    pct,
    quantile,
    round_sig,
    windowed_ppl,
)
from fse.tools.runner import Run, RunError, replay

if TYPE_CHECKING:
    from fse.core.policy import Policy
    from fse.core.types import Trip


def _limit(name: str) -> float:
    measure = spec(name).measure
    assert measure is not None and measure.limit is not None, name
    return measure.limit


QUANTILE = 0.999
MARGIN = 1.5
PPL_FLOOR = 100.0  # a default floor of the perplexity rule, not a limit
PPL_CEILING = _limit(PERPLEXITY)
L2_RMS_CEILING = 100.0  # nats; the L2 limit is this times sqrt(n_vocab)
VARIANCE_FLOOR = _limit(LOGIT_VARIANCE)
MAX_PROB_CONSECUTIVE_CEILING = int(_limit(MAX_PROB))
LOOP_SPAN_CEILING = int(_limit(LOOP))
DEFAULT_MAX_TOKENS = 128
# near_loop: the highest match fraction a non-looping generation reaches, plus this (one
# step of the 0.01 rounding: the tightest setting every healthy generation passes, as the
# other event guards get one token above theirs; counter loops sit only 0.03 to 0.09
# above the default 0.85, so a wider margin would let them through).
NEAR_MATCH_MARGIN = 0.01
# prompt_perplexity: the healthy maximum x PROMPT_MARGIN, at least the floors (a corpus of
# everyday prompts underestimates how odd an ordinary prompt with an id or a hash can be),
# at most the limits (below the 20,000+ that adversarial suffixes reach on the embedded
# model: docs/guards.md).
PROMPT_MARGIN = 4.0  # about 1.4 nats per token above the healthiest worst case
PROMPT_PPL_FLOOR = 1000.0
PROMPT_WINDOW_FLOOR = 5000.0
PROMPT_PPL_CEILING = _limit(PROMPT_PERPLEXITY)
PROMPT_WINDOW_CEILING = 5 * PROMPT_PPL_CEILING


@dataclass(slots=True)
class MetricRow:
    """One line of the calibration report."""

    metric: str
    n: int
    p50: float
    p99: float
    p999: float
    threshold: str  # as written to the policy, or "off"
    note: str = ""


@dataclass(slots=True)
class Calibration:
    policy: Policy
    rows: list[MetricRow]
    halts: list[tuple[Run, Trip]]  # calibration generations the policy would halt
    n_runs: int
    base: Policy
    base_halts: list[tuple[Run, Trip]]  # ... and those the base policy would halt
    warnings: list[str] = field(default_factory=list)

    @property
    def false_halt_rate(self) -> float:
        return len(self.halts) / max(1, self.n_runs)


@dataclass(slots=True)
class _Data:
    """The healthy runs and the settings every rule reads."""

    runs: Sequence[Run]
    q: float
    margin: float
    n_vocab: int
    spans: list[float]  # per generation: the longest tail cycle (see loop_span)
    healthy: list[int]  # generations whose cycle stays below the loop limit

    @property
    def low(self) -> float:
        return 1.0 - self.q

    def row(
        self,
        metric: str,
        values: Sequence[float],
        threshold: str,
        note: str = "",
        lo: bool = False,
    ) -> MetricRow:
        at = (0.5, 0.01, self.low) if lo else (0.5, 0.99, self.q)
        p50, p99, p999 = (quantile(values, x) for x in at)
        return MetricRow(metric, len(values), p50, p99, p999, threshold, note)


@dataclass(slots=True)
class _Tuned:
    """What a rule found: its report row, the calibrated config (None: the guard is off
    in the result), and any warnings."""

    row: MetricRow
    config: Any | None
    warnings: list[str] = field(default_factory=list)


# A rule: (the guard's entry, its config in the base policy or None, the data).
_Rule = Callable[[GuardSpec[Any], Any, _Data], _Tuned]


def _quantile_rule(guard: GuardSpec[Any], cfg: Any, d: _Data) -> _Tuned:
    """The generic rule, for any per-step metric: p_q x margin (a high tail, clamped to at
    most the limit) or p_(1-q) / margin (a low tail, clamped to at least the limit)."""
    measure = guard.measure
    assert measure is not None
    limit = measure.limit
    values = [float(getattr(m, measure.metric)) for r in d.runs for m in r.steps]
    warnings: list[str] = []
    # Computed even when the base leaves the guard off: the report shows the value a
    # policy enabling it would get.
    if measure.tail == "low":
        raw = quantile(values, d.low) / d.margin
        threshold = round_sig(raw, up=False)
        threshold = max(limit, threshold) if limit is not None else threshold
        bound = f"; limit >= {limit:g}" if limit is not None else ""
        label, note = f"{guard.name} (low tail)", f"p50 / p{pct(0.01)} / p{pct(d.low)}{bound}"
    else:
        raw = quantile(values, d.q) * d.margin
        threshold = round_sig(raw, up=True)
        if limit is not None:
            threshold = min(limit, threshold)
            if raw > limit and cfg is not None:
                warnings.append(
                    f"{guard.name}: healthy p{pct(d.q)} x margin = {raw:.4g} is above the "
                    f"hard limit {limit:g}; the limit is used"
                )
        label, note = guard.name, f"limit {fmt(limit)}" if limit is not None else ""
    tuned = replace(cfg, **{measure.key: threshold}) if cfg is not None else None
    shown = fmt(threshold) if cfg is not None else "off"
    if cfg is None and values:
        note = f"{note}; enabled it would get {fmt(threshold)}".lstrip("; ")
    return _Tuned(d.row(label, values, shown, note, lo=measure.tail == "low"), tuned, warnings)


def _windowed_ppl_rule(guard: GuardSpec[Any], cfg: Any, d: _Data) -> _Tuned:
    """Windowed perplexity (for the guard's window) from the step at which it is armed;
    at least PPL_FLOOR, at most the limit."""
    ppl_cfg = cfg if cfg is not None else guard.config()
    armed = max(0, ppl_cfg.min_tokens - 1)
    ppl = [
        v for r in d.runs for i, v in enumerate(windowed_ppl(r.steps, ppl_cfg.window)) if i >= armed
    ]
    ceiling = _limit(guard.name)
    threshold = math.nan
    tuned = None
    warnings: list[str] = []
    if cfg is not None and ppl:
        raw = quantile(ppl, d.q) * d.margin
        threshold = min(ceiling, max(PPL_FLOOR, round_sig(raw, up=True)))
        tuned = replace(cfg, threshold=threshold)
        if raw > ceiling:
            warnings.append(
                f"{guard.name}: healthy p{pct(d.q)} x margin = {raw:.4g} is above the hard limit "
                f"{ceiling:g}; the limit is used and healthy text will be halted (sample "
                "less loosely, or check that the corpus is healthy)"
            )
    row = d.row(
        f"{guard.name} (window {ppl_cfg.window or 'cumulative'})",
        ppl,
        fmt(threshold) if cfg is not None else "off",
        f"floor {PPL_FLOOR:g}, limit {ceiling:g}",
    )
    return _Tuned(row, tuned, warnings)


def _l2_vocab_rule(guard: GuardSpec[Any], cfg: Any, d: _Data) -> _Tuned:
    """p_q x margin, at most the physical limit L2_RMS_CEILING x sqrt(n_vocab)."""
    l2 = [m.l2_norm for r in d.runs for m in r.steps]
    limit = round_sig(L2_RMS_CEILING * math.sqrt(max(1, d.n_vocab)), up=False)
    threshold = math.nan
    tuned = None
    warnings: list[str] = []
    if cfg is not None:
        raw = quantile(l2, d.q) * d.margin
        threshold = min(limit, round_sig(raw, up=True))
        tuned = replace(cfg, threshold=threshold)
        if raw > limit:
            warnings.append(
                f"{guard.name}: healthy p{pct(d.q)} x margin = {raw:.4g} is above the physical "
                f"limit {limit:g} (RMS logit {L2_RMS_CEILING:g} nats); the limit is used"
            )
    shown = fmt(threshold) if cfg is not None else "off"
    return _Tuned(d.row(guard.name, l2, shown, f"limit {fmt(limit)}"), tuned, warnings)


def _run_length_rule(guard: GuardSpec[Any], cfg: Any, d: _Data) -> _Tuned:
    """consecutive = one above the longest run above the (kept) threshold per non-looping
    generation, at least the base's, at most the limit."""
    mp_cfg = cfg if cfg is not None else guard.config()
    limit = int(_limit(guard.name))
    mp = [m.max_prob for r in d.runs for m in r.steps]
    streaks = [
        float(longest_streak([m.max_prob for m in d.runs[i].steps], mp_cfg.threshold))
        for i in d.healthy
    ]
    streak_q = quantile(streaks, d.q)
    consecutive = mp_cfg.consecutive
    tuned = None
    warnings: list[str] = []
    if cfg is not None:
        consecutive = _event_threshold(streak_q, cfg.consecutive, limit)
        tuned = replace(cfg, consecutive=consecutive)
        if streak_q + 1 > limit:
            warnings.append(
                f"{guard.name}: non-looping generations stay above {mp_cfg.threshold:g} for up "
                f"to {streak_q:g} steps; consecutive is capped at {limit}"
            )
    row = d.row(
        guard.name,
        mp,
        f"{mp_cfg.threshold:g} x {consecutive}" if cfg is not None else "off",
        f"longest run above {mp_cfg.threshold:g}, non-looping p{pct(d.q)}: {fmt(streak_q)} steps",
    )
    return _Tuned(row, tuned, warnings)


def _loop_span_rule(guard: GuardSpec[Any], cfg: Any, d: _Data) -> _Tuned:
    """min_span = one above the longest tail cycle per non-looping generation, at least
    the base's, at most the limit. A generation whose cycle reaches the limit is a loop
    by definition, not healthy data: left out (and shown as an expected halt)."""
    loop_cfg = cfg if cfg is not None else guard.config()
    limit = int(_limit(guard.name))
    spans = d.spans
    n_loops = len(d.runs) - len(d.healthy)
    span_q = quantile([spans[i] for i in d.healthy], d.q)
    min_span = loop_cfg.min_span
    tuned = None
    warnings: list[str] = []
    if cfg is not None:
        min_span = _event_threshold(span_q, cfg.min_span, limit)
        tuned = replace(cfg, min_span=min_span)
        if span_q + 1 > limit:
            warnings.append(
                f"{guard.name}: non-looping generations repeat a cycle over up to {span_q:g} "
                f"tokens; min_span is capped at {limit}"
            )
    if n_loops:
        warnings.append(
            f"{guard.name}: {n_loops} of {len(d.runs)} calibration generations end in a cycle "
            f"covering {limit} tokens or more (up to {max(spans):g}); they are loops, not "
            "healthy text: left out of the loop and max_prob statistics, counted as halts"
        )
    row = d.row(
        f"loop span (>= {loop_cfg.min_repeats} repeats, per generation)",
        spans,
        f"{loop_cfg.min_repeats} repeats / {min_span} tokens" if cfg is not None else "off",
        f"non-looping p{pct(d.q)} {fmt(span_q)}; limit {limit} tokens",
    )
    return _Tuned(row, tuned, warnings)


def best_match(tokens: Sequence[int], max_period: int, min_copies: int, min_span: int) -> float:
    """The highest match fraction any period reaches over a generation (see near_loop)."""
    detector = NearLoopDetector(max_period, min_copies, min_span, 1.0)
    best = 0.0
    for token in tokens:
        detector.push(token)
        best = max(best, detector.best()[1])
    return best


def _near_loop_match_rule(guard: GuardSpec[Any], cfg: Any, d: _Data) -> _Tuned:
    """min_match = p_q(highest match fraction per non-looping generation) + NEAR_MATCH_MARGIN,
    rounded up to 0.01, at least the base's, at most the limit. A generation that already
    reaches the base's min_match is a near-verbatim loop by the base's own definition
    (small models write them in ordinary sampling: counters, renumbered lists), not
    healthy data: left out, and shown as a halt. Letting those set the threshold would
    raise it past the counter loops it exists to catch (0.88 to 0.94 on the embedded
    model), so calibration only raises min_match for healthy text that comes close."""
    nl_cfg = cfg if cfg is not None else guard.config()
    limit = _limit(guard.name)
    matches = [
        best_match([m.token for m in d.runs[i].steps], *_near_loop_shape(nl_cfg)) for i in d.healthy
    ]
    healthy = [x for x in matches if x < nl_cfg.min_match]
    match_q = quantile(healthy, d.q)
    min_match = nl_cfg.min_match
    if math.isfinite(match_q):
        raised = math.ceil((match_q + NEAR_MATCH_MARGIN) * 100 - 1e-9) / 100
        min_match = min(limit, max(nl_cfg.min_match, raised))
    warnings: list[str] = []
    if cfg is not None and len(healthy) < len(matches):
        warnings.append(
            f"{guard.name}: {len(matches) - len(healthy)} of {len(d.runs)} calibration "
            f"generations repeat a period with {nl_cfg.min_match:g} of their tokens or more "
            "equal one period back; they are near-verbatim loops, not healthy text: left "
            "out of the near_loop statistics, counted as halts"
        )
    tuned = replace(cfg, min_match=min_match) if cfg is not None else None
    shown = (
        f"{min_match:g} match / {nl_cfg.min_copies} copies / {nl_cfg.min_span} tokens"
        if cfg is not None
        else "off"
    )
    note = f"non-looping p{pct(d.q)} {fmt(match_q)}; limit {limit:g}"
    if cfg is None and healthy:
        note += f"; enabled it would get {min_match:g}"
    return _Tuned(
        d.row(f"{guard.name} match (per generation)", matches, shown, note), tuned, warnings
    )


def _near_loop_shape(cfg: Any) -> tuple[int, int, int]:
    return cfg.max_period, cfg.min_copies, cfg.min_span


def _prompt_ppl_rule(guard: GuardSpec[Any], cfg: Any, d: _Data) -> _Tuned:
    """Whole-prompt and worst-window perplexity, once per distinct prompt: each threshold
    is max(p_q x PROMPT_MARGIN, its floor), at most its limit. Through a daemon the
    prompt's nll is not reported: the base's settings are kept, with a warning."""
    pcfg = cfg if cfg is not None else guard.config()
    nll = {r.prompt: r.prompt_nll for r in d.runs if r.prompt_nll is not None}
    scores = [prompt_perplexities(x, pcfg.skip, pcfg.window) for x in nll.values()]
    whole, windowed = [s[0] for s in scores], [s[1] for s in scores]
    label = f"{guard.name} (whole / window {pcfg.window}, per prompt)"
    if not scores:
        shown = "off" if cfg is None else f"{fmt(cfg.threshold)} / {fmt(cfg.window_threshold)}"
        row = MetricRow(label, 0, math.nan, math.nan, math.nan, shown, "not measured")
        warning = (
            f"{guard.name}: the prompts' perplexity is measured in process only (a daemon "
            "does not report it); the base policy's settings are kept"
        )
        return _Tuned(row, cfg, [warning] if cfg is not None else [])
    whole_t = _prompt_threshold(whole, d.q, PROMPT_PPL_FLOOR, PROMPT_PPL_CEILING)
    window_t = _prompt_threshold(windowed, d.q, PROMPT_WINDOW_FLOOR, PROMPT_WINDOW_CEILING)
    warnings = [
        f"{guard.name}: an ordinary prompt of the corpus reaches {what} perplexity "
        f"{worst:,.0f}, above the limit {limit:g} x 1/{PROMPT_MARGIN:g}; the limit is used "
        "and such prompts will be refused (check that the corpus is ordinary text)"
        for what, worst, limit in (
            ("whole-prompt", max(whole), PROMPT_PPL_CEILING),
            ("windowed", max(windowed), PROMPT_WINDOW_CEILING),
        )
        if cfg is not None and worst * PROMPT_MARGIN > limit
    ]
    tuned = replace(cfg, threshold=whole_t, window_threshold=window_t) if cfg else None
    shown = f"{fmt(whole_t)} / {fmt(window_t)}" if cfg is not None else "off"
    note = (
        f"window p50 {fmt(quantile(windowed, 0.5))}, max {fmt(max(windowed))}; "
        f"floors {PROMPT_PPL_FLOOR:g} / {PROMPT_WINDOW_FLOOR:g}, "
        f"limits {PROMPT_PPL_CEILING:g} / {PROMPT_WINDOW_CEILING:g}"
    )
    return _Tuned(d.row(label, whole, shown, note), tuned, warnings)


def _prompt_threshold(values: Sequence[float], q: float, floor: float, ceiling: float) -> float:
    return min(ceiling, max(floor, round_sig(quantile(values, q) * PROMPT_MARGIN, up=True)))


# The rules a registry entry's measure may name (Measure.rule).
RULES: dict[str, _Rule] = {
    "quantile": _quantile_rule,
    "windowed_ppl": _windowed_ppl_rule,
    "l2_vocab": _l2_vocab_rule,
    "run_length": _run_length_rule,
    "loop_span": _loop_span_rule,
    "prompt_ppl": _prompt_ppl_rule,
    "near_loop_match": _near_loop_match_rule,
}


def calibrate_policy(
    runs: Sequence[Run],
    base: Policy,
    *,
    name: str,
    n_vocab: int,
    q: float = QUANTILE,
    margin: float = MARGIN,
    description: str = "",
) -> Calibration:
    """Thresholds from healthy runs: every guard of the registry with a measure, by its
    rule (see the module docstring); a guard without one keeps the base's setting."""
    from fse.core.policy import HealthBands, Policy

    if not runs or not any(r.steps for r in runs):
        raise RunError("calibration produced no tokens; nothing to measure")
    # Which generations loop (a cycle reaching the loop limit) is decided once, with the
    # base's loop settings (or the defaults): the event guards' statistics leave them out.
    loop_cfg = base.loop if base.loop is not None else LoopGuard()
    spans = [
        float(loop_span([m.token for m in r.steps], loop_cfg.max_period, loop_cfg.min_repeats))
        for r in runs
    ]
    healthy = [i for i, span in enumerate(spans) if span < LOOP_SPAN_CEILING]
    data = _Data(runs, q, margin, n_vocab, spans, healthy)

    rows: list[MetricRow] = []
    warnings: list[str] = []
    fields: dict[str, Any] = {}
    for guard in GUARDS:
        cfg = getattr(base, guard.name)
        if guard.measure is None:
            if cfg is not None:
                fields[guard.name] = cfg
            continue
        tuned = RULES[guard.measure.rule](guard, cfg, data)
        rows.append(tuned.row)
        warnings += tuned.warnings
        if tuned.config is not None:
            fields[guard.name] = tuned.config

    health = base.health
    if "perplexity" in fields:
        ppl_threshold = fields["perplexity"].threshold
        health = HealthBands(
            green_below=min(base.health.green_below, ppl_threshold / 2), red_above=ppl_threshold
        )
    policy = Policy(name=name, health=health, description=description, **fields)
    halts = [(r, t) for r in runs if (t := replay(r.steps, policy, r.prompt_nll)) is not None]
    base_halts = [(r, t) for r in runs if (t := replay(r.steps, base, r.prompt_nll)) is not None]
    return Calibration(policy, rows, halts, len(runs), base, base_halts, warnings)


def _event_threshold(stat: float, base: int, limit: int) -> int:
    """One above the healthy maximum `stat` (the tightest setting every healthy generation
    passes), at least the base value, at most the limit; the limit when there is no healthy
    data (stat is NaN)."""
    if not math.isfinite(stat):
        return limit
    return min(limit, max(base, math.floor(stat) + 1))
