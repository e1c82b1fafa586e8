"""Guards on the prompt, judged once after prefill: the prompt's perplexity under the
served model itself."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fse.core.registry.spec import (
    GuardSpec,
    Measure,
    PromptJudge,
    check_action,
    check_float,
    check_int,
    set_field,
)
from fse.core.types import PROMPT_PERPLEXITY, Action, Trip

# ---------------------------------------------------------------------------
# prompt_perplexity


@dataclass(frozen=True, slots=True)
class PromptPerplexityGuard:
    """Refuse a prompt whose perplexity under the served model is too high: over the
    whole prompt (`threshold`), or over its worst window of `window` tokens
    (`window_threshold`: a gibberish suffix on an ordinary prompt). The first `skip`
    tokens are left out: right after BOS nothing is predictable yet."""

    # Measured on the embedded model (skip 4, window 16): ordinary prompts, code, hashes,
    # ids, base64, French and German 1.5-147 whole and 2-307 windowed; a GCG-style
    # suffix 21,900 / 217,000; a random-word suffix 20,800 / 84,000; keyboard gibberish
    # 1,630 / 1,910 (docs/guards.md).
    threshold: float = 1000.0
    window: int = 16
    window_threshold: float = 5000.0
    skip: int = 4
    action: Action = "halt"

    def __post_init__(self) -> None:
        k = "guards.prompt_perplexity."
        for key in ("threshold", "window_threshold"):
            value = check_float(k + key, getattr(self, key), lambda x: x > 1, "value > 1, finite")
            set_field(self, key, value)
        check_int(k + "window", self.window, 1, 4096)
        check_int(k + "skip", self.skip, 0, 4096)
        check_action(k + "action", self.action)


def prompt_perplexities(nll: Sequence[float], skip: int, window: int) -> tuple[float, float]:
    """(whole-prompt perplexity, largest windowed perplexity) of the prompt tokens'
    nll (the model's -log p of each token after the first), the first `skip` left out;
    (1, 1) when nothing is left; a window longer than what is left is the whole."""
    scored = nll[skip:]
    if not scored:
        return 1.0, 1.0
    whole = _exp(math.fsum(scored) / len(scored))
    span = min(window, len(scored))
    running = math.fsum(scored[:span])
    worst = running
    for i in range(span, len(scored)):
        running += scored[i] - scored[i - span]
        worst = max(worst, running)
    return whole, _exp(worst / span)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 or x != x else math.inf  # NaN stays NaN


def _prompt_perplexity(cfg: PromptPerplexityGuard) -> PromptJudge:
    def judge(nll: Sequence[float]) -> Trip | None:
        whole, windowed = prompt_perplexities(nll, cfg.skip, cfg.window)
        if whole != whole or windowed != windowed:
            raise ValueError("NaN prompt perplexity")
        if whole > cfg.threshold:
            return Trip(PROMPT_PERPLEXITY, whole, cfg.threshold, 0, cfg.action)
        if windowed > cfg.window_threshold:
            return Trip(PROMPT_PERPLEXITY, windowed, cfg.window_threshold, 0, cfg.action)
        return None

    return judge


PROMPT_PERPLEXITY_SPEC = GuardSpec(
    PROMPT_PERPLEXITY,
    PromptPerplexityGuard,
    None,
    summary=lambda c: (
        f"prompt_perplexity {c.threshold:g} (window {c.window}: {c.window_threshold:g})"
    ),
    # metric: what calibrate reads (Run.prompt_nll, not a StepMetrics attribute)
    measure=Measure("threshold", "prompt_nll", "high", limit=10000.0, rule="prompt_ppl"),
    marker="P",
    judge_prompt=_prompt_perplexity,
)
