"""`fse calibrate`: thresholds measured on the operator's own model.

The rules (which quantile, margin and hard limit each guard gets, and why) are written
once, in docs/calibration.md; each guard's entry in fse.core.registry carries its
`measure`. This module reads the corpus, collects the data, applies the rules and
reports; the flags are fse.cli.calibrate's and the runners fse.tools.runner's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fse.core.errors import InputError
from fse.core.registry import GUARDS, GuardSpec, LoopGuard, spec
from fse.core.types import LOGIT_VARIANCE, LOOP, MAX_PROB, PERPLEXITY
from fse.tools.runner import (
    Progress,
    Prompt,
    Run,
    RunError,
    Runner,
    observe_policy,
    replay,
    steps_json,
)

if TYPE_CHECKING:
    from fse.core.policy import Policy
    from fse.core.types import Sampling, StepMetrics, Trip

__all__ = [
    "Calibration",
    "MetricRow",
    "Prompt",
    "Run",
    "RunError",
    "builtin_prompts",
    "calibrate_policy",
    "collect",
    "longest_streak",
    "loop_span",
    "metrics_json",
    "policy_file_text",
    "quantile",
    "read_corpus",
    "report_lines",
    "windowed_ppl",
]


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

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# ---------------------------------------------------------------------------
# Prompts and corpora


def builtin_prompts() -> list[Prompt]:
    """The built-in calibration prompt set (fse/data/calibration_prompts.txt)."""
    resource = resources.files("fse") / "data" / "calibration_prompts.txt"
    text = resource.read_text(encoding="utf-8")
    return _text_prompts(text, "<built-in calibration_prompts.txt>")


def _text_prompts(text: str, source: str) -> list[Prompt]:
    return [
        Prompt(text=line, source=f"{source}:{n}")
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]


def read_corpus(path: Path, flag: str = "--corpus") -> list[Prompt]:
    """Prompts of a corpus file; any problem is an InputError naming flag, file and line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{flag}: {path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{flag}: {path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        prompts = _jsonl_prompts(text, path, flag)
    else:
        prompts = _text_prompts(text, str(path))
    if not prompts:
        raise InputError(f"{flag}: {path}: no prompts (empty file)")
    return prompts


def _jsonl_prompts(text: str, path: Path, flag: str) -> list[Prompt]:
    out: list[Prompt] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{flag}: {path} line {n}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(doc, dict):
            raise InputError(f'{where}: expected an object with "prompt" or "messages"')
        unknown = sorted(set(doc) - {"prompt", "messages"})
        if unknown:
            raise InputError(f'{where}: unknown key "{unknown[0]}"; accepted: prompt, messages')
        prompt, messages = doc.get("prompt"), doc.get("messages")
        if (prompt is None) == (messages is None):
            raise InputError(f'{where}: give exactly one of "prompt" and "messages"')
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f'{where}: "prompt" must be a non-empty string')
            out.append(Prompt(text=prompt, source=f"{path}:{n}"))
            continue
        if not isinstance(messages, list) or not messages:
            raise InputError(f'{where}: "messages" must be a non-empty list')
        pairs: list[tuple[str, str]] = []
        for i, msg in enumerate(messages):
            ok = (
                isinstance(msg, dict)
                and set(msg) == {"role", "content"}
                and isinstance(msg["role"], str)
                and msg["role"]
                and isinstance(msg["content"], str)
            )
            if not ok:
                raise InputError(
                    f'{where}: "messages[{i}]" must be {{"role": non-empty string, '
                    f'"content": string}}'
                )
            pairs.append((msg["role"], msg["content"]))
        out.append(Prompt(messages=tuple(pairs), source=f"{path}:{n}"))
    return out


# ---------------------------------------------------------------------------
# Statistics


def windowed_ppl(steps: Sequence[StepMetrics], window: int) -> list[float]:
    from fse.core.metrics import PerplexityWindow

    w = PerplexityWindow(window)
    return [w.push(m.nll)[0] for m in steps]


def longest_streak(values: Sequence[float], threshold: float) -> int:
    """Longest run of consecutive values above threshold."""
    best = run = 0
    for v in values:
        run = run + 1 if v > threshold else 0
        best = max(best, run)
    return best


def loop_span(tokens: Sequence[int], max_period: int, min_repeats: int) -> int:
    """Largest number of tokens covered by a tail cycle (period <= max_period, repeated
    at least min_repeats times) at any point of the sequence; 0 if there was none.

    The loop guard with these max_period/min_repeats trips iff this is >= min_span, so
    min_span = this + 1 is the tightest setting that lets the sequence pass. For each
    period p, run_p = the longest stretch of tokens equal to the token p before them; a
    cycle of period p then covers run_p + p tokens, counted if run_p + p >= repeats x p.
    """
    import numpy as np

    t = np.asarray(tokens, dtype=np.int64)
    best = 0
    for p in range(1, min(max_period, len(t) // min_repeats) + 1):
        eq = t[p:] == t[:-p]
        if not eq.any():
            continue
        # Longest run of True: distance between consecutive False positions.
        false_at = np.flatnonzero(~np.concatenate(([False], eq, [False])))
        run = int(np.diff(false_at).max()) - 1
        if run > 0 and run + p >= min_repeats * p:
            best = max(best, run + p)
    return best


def quantile(values: Sequence[float], q: float) -> float:
    """An observed value: numpy's "higher" method above the median, "lower" below it."""
    import numpy as np

    if not len(values):
        return math.nan
    method: Literal["higher", "lower"] = "higher" if q >= 0.5 else "lower"
    return float(np.quantile(np.asarray(values, dtype=np.float64), q, method=method))


def _round_sig(x: float, up: bool, digits: int = 3) -> float:
    """x rounded to `digits` significant digits, up or down."""
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    n = math.ceil(x / scale - 1e-9) if up else math.floor(x / scale + 1e-9)
    return float(f"{n * scale:.{digits}g}")


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
    threshold = math.nan
    if measure.tail == "low":
        if cfg is not None:
            raw = quantile(values, d.low) / d.margin
            threshold = _round_sig(raw, up=False)
            threshold = max(limit, threshold) if limit is not None else threshold
        bound = f"; limit >= {limit:g}" if limit is not None else ""
        label, note = f"{guard.name} (low tail)", f"p50 / p{_pct(0.01)} / p{_pct(d.low)}{bound}"
    else:
        if cfg is not None:
            raw = quantile(values, d.q) * d.margin
            threshold = _round_sig(raw, up=True)
            if limit is not None:
                threshold = min(limit, threshold)
                if raw > limit:
                    warnings.append(
                        f"{guard.name}: healthy p{_pct(d.q)} x margin = {raw:.4g} is above the "
                        f"hard limit {limit:g}; the limit is used"
                    )
        label, note = guard.name, f"limit {_fmt(limit)}" if limit is not None else ""
    tuned = replace(cfg, **{measure.key: threshold}) if cfg is not None else None
    shown = _fmt(threshold) if cfg is not None else "off"
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
        threshold = min(ceiling, max(PPL_FLOOR, _round_sig(raw, up=True)))
        tuned = replace(cfg, threshold=threshold)
        if raw > ceiling:
            warnings.append(
                f"{guard.name}: healthy p{_pct(d.q)} x margin = {raw:.4g} is above the hard limit "
                f"{ceiling:g}; the limit is used and healthy text will be halted (sample "
                "less loosely, or check that the corpus is healthy)"
            )
    row = d.row(
        f"{guard.name} (window {ppl_cfg.window or 'cumulative'})",
        ppl,
        _fmt(threshold) if cfg is not None else "off",
        f"floor {PPL_FLOOR:g}, limit {ceiling:g}",
    )
    return _Tuned(row, tuned, warnings)


def _l2_vocab_rule(guard: GuardSpec[Any], cfg: Any, d: _Data) -> _Tuned:
    """p_q x margin, at most the physical limit L2_RMS_CEILING x sqrt(n_vocab)."""
    l2 = [m.l2_norm for r in d.runs for m in r.steps]
    limit = _round_sig(L2_RMS_CEILING * math.sqrt(max(1, d.n_vocab)), up=False)
    threshold = math.nan
    tuned = None
    warnings: list[str] = []
    if cfg is not None:
        raw = quantile(l2, d.q) * d.margin
        threshold = min(limit, _round_sig(raw, up=True))
        tuned = replace(cfg, threshold=threshold)
        if raw > limit:
            warnings.append(
                f"{guard.name}: healthy p{_pct(d.q)} x margin = {raw:.4g} is above the physical "
                f"limit {limit:g} (RMS logit {L2_RMS_CEILING:g} nats); the limit is used"
            )
    shown = _fmt(threshold) if cfg is not None else "off"
    return _Tuned(d.row(guard.name, l2, shown, f"limit {_fmt(limit)}"), tuned, warnings)


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
        f"longest run above {mp_cfg.threshold:g}, non-looping p{_pct(d.q)}: {_fmt(streak_q)} steps",
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
        f"non-looping p{_pct(d.q)} {_fmt(span_q)}; limit {limit} tokens",
    )
    return _Tuned(row, tuned, warnings)


# The rules a registry entry's measure may name (Measure.rule).
RULES: dict[str, _Rule] = {
    "quantile": _quantile_rule,
    "windowed_ppl": _windowed_ppl_rule,
    "l2_vocab": _l2_vocab_rule,
    "run_length": _run_length_rule,
    "loop_span": _loop_span_rule,
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
    halts = [(r, trip) for r in runs if (trip := replay(r.steps, policy)) is not None]
    base_halts = [(r, trip) for r in runs if (trip := replay(r.steps, base)) is not None]
    return Calibration(policy, rows, halts, len(runs), base, base_halts, warnings)


def _event_threshold(stat: float, base: int, limit: int) -> int:
    """One above the healthy maximum `stat` (the tightest setting every healthy generation
    passes), at least the base value, at most the limit; the limit when there is no healthy
    data (stat is NaN)."""
    if not math.isfinite(stat):
        return limit
    return min(limit, max(base, math.floor(stat) + 1))


def _pct(q: float) -> str:
    return f"{q * 100:.4g}"


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if abs(x) >= 1e6 or (x != 0 and abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def policy_name_for(path: Path) -> str:
    """A valid policy name from a file name (`calibrated.toml` -> `calibrated`)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem)[:64].strip(".-") or "calibrated"
    return stem if _NAME_RE.fullmatch(stem) else "calibrated"


# ---------------------------------------------------------------------------
# A calibration run


def collect(
    runner: Runner,
    prompts: Sequence[Prompt],
    *,
    samples: int,
    max_tokens: int,
    sampling: Sampling,
    base_seed: int,
    progress: str | None = None,
) -> list[Run]:
    """Every prompt `samples` times under the observe-only policy, generation i with seed
    base_seed + i. A daemon must serve that policy; a failed generation is a RunError.
    With `progress`, a progress bar with that label is drawn on stderr."""
    observe = observe_policy()
    jobs = [(p, max_tokens) for p in prompts for _ in range(samples)]
    if not runner.serves(observe):
        raise InputError(
            f"--addr: the {runner.where} does not serve the observe-only policy "
            f"{observe.name!r} (no guard but non_finite); put {observe.name}.toml "
            f'holding the line name = "{observe.name}" in its --policies-dir'
        )
    runner.prepare(jobs)
    bar = Progress(len(jobs), progress) if progress is not None else None
    runs: list[Run] = []
    for i, (prompt, tokens) in enumerate(jobs):
        seed = (base_seed + i) % 2**32
        run = runner.run(prompt, replace(sampling, seed=seed), tokens, observe)
        if run.status == "error":
            raise RunError(f"{prompt.source}: generation failed: {run.message}")
        runs.append(run)
        if bar is not None:
            bar.advance(prompt.label)
    return runs


def settings_text(s: Sampling) -> str:
    """'greedy', or the sampling settings in a phrase (the report and the description)."""
    if s.temperature == 0:
        return "greedy"
    return f"temperature {s.temperature:g}, top_k {s.top_k}, top_p {s.top_p:g}, min_p {s.min_p:g}"


def description_text(
    model: str,
    n_runs: int,
    corpus: str,
    settings: str,
    max_tokens: int,
    q: float,
    margin: float,
    base: Policy,
) -> str:
    """The calibrated policy's description: how it was made."""
    return (
        f"calibrated by fse calibrate for {model} on {n_runs} generations "
        f"({corpus}; {settings}; up to {max_tokens} tokens); thresholds at "
        f"p{_pct(q)} x {margin:g}, clamped to hard limits; base policy "
        f"{base.name}"
    )


def policy_file_text(cal: Calibration, runs: Sequence[Run], model: str, settings: str) -> str:
    """The policy file: the report as a comment header, then the policy's TOML."""
    header = "".join(
        f"# {line}\n" if line else "#\n" for line in report_lines(cal, runs, model, settings)
    )
    return header + "\n" + cal.policy.to_toml()


# ---------------------------------------------------------------------------
# The report


def report_lines(cal: Calibration, runs: Sequence[Run], model: str, settings: str) -> list[str]:
    tokens = sum(len(r.steps) for r in runs)
    lines = [
        f"calibration of {model}: {len(runs)} generations, {tokens} tokens ({settings})",
        "",
        f"{'metric':<44} {'p50':>9} {'p99':>9} {'p99.9':>9}  threshold",
    ]
    for r in cal.rows:
        lines.append(
            f"{r.metric:<44} {_fmt(r.p50):>9} {_fmt(r.p99):>9} {_fmt(r.p999):>9}  "
            f"{r.threshold}   ({r.note})"
        )
    lines.append("")
    lines.append(
        f"expected false-halt rate on the calibration set: {len(cal.halts)}/{cal.n_runs} "
        f"({cal.false_halt_rate:.1%}){_by_guard(cal.halts)}"
    )
    lines.append(
        f"  (the base policy {cal.base.name} as shipped would halt "
        f"{len(cal.base_halts)}/{cal.n_runs} ({len(cal.base_halts) / max(1, cal.n_runs):.1%})"
        f"{_by_guard(cal.base_halts)})"
    )
    for run, trip in cal.halts[:8]:
        before = "".join(run.pieces[: trip.token_index])
        tail = " ".join(before.split())[-40:]
        lines.append(
            f"  {trip.guard} at token {trip.token_index}: {run.prompt.source}: "
            f"{json.dumps(run.prompt.label, ensure_ascii=False)} ... "
            f"{json.dumps(tail, ensure_ascii=False)}"
        )
    if len(cal.halts) > 8:
        lines.append(f"  ... and {len(cal.halts) - 8} more")
    for warning in cal.warnings:
        lines.append(f"warning: {warning}")
    return lines


def _by_guard(halts: Sequence[tuple[Run, Trip]]) -> str:
    counts: dict[str, int] = {}
    for _, trip in halts:
        counts[trip.guard] = counts.get(trip.guard, 0) + 1
    return "".join(
        f"{', ' if i else ': '}{g} x{n}" for i, (g, n) in enumerate(sorted(counts.items()))
    )


def metrics_json(runs: Sequence[Run]) -> dict[str, Any]:
    return {
        "runs": [
            {
                "source": r.prompt.source,
                "prompt": r.prompt.text,
                "messages": [list(m) for m in r.prompt.messages],
                "seed": r.seed,
                "status": r.status,
                "text": r.text,
                "steps": steps_json(r.steps),
            }
            for r in runs
        ]
    }
