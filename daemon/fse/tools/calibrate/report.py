"""What calibration writes: the policy file with its report as a comment header, the
report printed to the operator, and the metrics as JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fse.tools.calibrate.stats import fmt, pct
from fse.tools.runner import Run, steps_json

if TYPE_CHECKING:
    from fse.core.policy import Policy
    from fse.core.types import Sampling, Trip
    from fse.tools.calibrate.rules import Calibration


_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def policy_name_for(path: Path) -> str:
    """A valid policy name from a file name (`calibrated.toml` -> `calibrated`)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem)[:64].strip(".-") or "calibrated"
    return stem if _NAME_RE.fullmatch(stem) else "calibrated"


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
        f"p{pct(q)} x {margin:g}, clamped to hard limits; base policy "
        f"{base.name}"
    )


def policy_file_text(cal: Calibration, runs: Sequence[Run], model: str, settings: str) -> str:
    """The policy file: the report as a comment header, then the policy's TOML."""
    header = "".join(
        f"# {line}\n" if line else "#\n" for line in report_lines(cal, runs, model, settings)
    )
    return header + "\n" + cal.policy.to_toml()


def report_lines(cal: Calibration, runs: Sequence[Run], model: str, settings: str) -> list[str]:
    tokens = sum(len(r.steps) for r in runs)
    lines = [
        f"calibration of {model}: {len(runs)} generations, {tokens} tokens ({settings})",
        "",
        f"{'metric':<44} {'p50':>9} {'p99':>9} {'p99.9':>9}  threshold",
    ]
    for r in cal.rows:
        lines.append(
            f"{r.metric:<44} {fmt(r.p50):>9} {fmt(r.p99):>9} {fmt(r.p999):>9}  "
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
                "prompt_nll": r.prompt_nll,
                "steps": steps_json(r.steps),
            }
            for r in runs
        ]
    }
