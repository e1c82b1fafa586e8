"""`fse calibrate`: thresholds measured on the operator's own model.

The rules (which quantile, margin and hard limit each guard gets, and why) are written
once, in docs/calibration.md; each guard's entry in fse.core.registry carries its
`measure`. This module reads the corpus, collects the data, applies the rules and
reports; the flags are fse.cli.calibrate's and the runners fse.tools.runner's.
"""

from __future__ import annotations

from fse.tools.calibrate.collect import collect
from fse.tools.calibrate.corpus import builtin_prompts, read_corpus
from fse.tools.calibrate.report import (
    description_text,
    metrics_json,
    policy_file_text,
    policy_name_for,
    report_lines,
    settings_text,
)
from fse.tools.calibrate.rules import (
    DEFAULT_MAX_TOKENS,
    LOOP_SPAN_CEILING,
    MARGIN,
    MAX_PROB_CONSECUTIVE_CEILING,
    NEAR_MATCH_MARGIN,
    PPL_CEILING,
    PPL_FLOOR,
    PROMPT_MARGIN,
    PROMPT_PPL_CEILING,
    PROMPT_PPL_FLOOR,
    PROMPT_WINDOW_CEILING,
    PROMPT_WINDOW_FLOOR,
    QUANTILE,
    VARIANCE_FLOOR,
    Calibration,
    MetricRow,
    best_match,
    calibrate_policy,
)
from fse.tools.calibrate.stats import longest_streak, loop_span, quantile, round_sig, windowed_ppl
from fse.tools.runner import Prompt, Run, RunError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "LOOP_SPAN_CEILING",
    "MARGIN",
    "MAX_PROB_CONSECUTIVE_CEILING",
    "NEAR_MATCH_MARGIN",
    "PPL_CEILING",
    "PPL_FLOOR",
    "PROMPT_MARGIN",
    "PROMPT_PPL_CEILING",
    "PROMPT_PPL_FLOOR",
    "PROMPT_WINDOW_CEILING",
    "PROMPT_WINDOW_FLOOR",
    "QUANTILE",
    "VARIANCE_FLOOR",
    "Calibration",
    "MetricRow",
    "Prompt",
    "Run",
    "RunError",
    "best_match",
    "builtin_prompts",
    "calibrate_policy",
    "collect",
    "description_text",
    "longest_streak",
    "loop_span",
    "metrics_json",
    "policy_file_text",
    "policy_name_for",
    "quantile",
    "read_corpus",
    "report_lines",
    "round_sig",
    "settings_text",
    "windowed_ppl",
]
