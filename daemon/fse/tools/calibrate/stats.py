"""The statistics calibration reads off healthy generations: windowed perplexity,
streaks, tail cycles, quantiles that are observed values, rounding away from the data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from fse.core.types import StepMetrics


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


def round_sig(x: float, up: bool, digits: int = 3) -> float:
    """x rounded to `digits` significant digits, up or down."""
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    n = math.ceil(x / scale - 1e-9) if up else math.floor(x / scale + 1e-9)
    return float(f"{n * scale:.{digits}g}")


def pct(q: float) -> str:
    return f"{q * 100:.4g}"


def fmt(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if abs(x) >= 1e6 or (x != 0 and abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
