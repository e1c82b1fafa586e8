"""Running a suite: every category x policy x prompt x seed (and the unguarded
reference runs), and the report document built from the runs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fse.core.errors import InputError
from fse.tools.experiment.report import (
    _clean,
    alone_rows,
    input_rows,
    rates,
    render_markdown,
    run_json,
    table_rows,
)
from fse.tools.experiment.suite import Category, CellRun, Suite, apply_override, sampling_for
from fse.tools.runner import Progress, Prompt, Run, Runner, observe_policy, replay, write_atomic

if TYPE_CHECKING:
    from fse.core.policy import Policy


def run_suite(
    runner: Runner,
    suite: Suite,
    policies: Sequence[Policy],
    *,
    seeds: int,
    max_tokens: int | None,
    base_seed: int,
    reference: bool = True,
    progress: Progress | None = None,
) -> list[CellRun]:
    """Every category x policy x prompt x seed, in that order; with `reference`, each
    category's prompts and seeds first run once unguarded (for the plots)."""
    observe = observe_policy()
    jobs: list[tuple[Category, Policy | None, Prompt, int, int]] = []  # None: reference
    for cat in suite.categories:
        tokens = max_tokens or cat.max_tokens or suite.max_tokens
        for policy in [None, *policies] if reference else policies:
            for p, text in enumerate(cat.prompts):
                for k in range(seeds):
                    prompt = Prompt(text=text, source=f"{cat.name}[{p}]")
                    jobs.append((cat, policy, prompt, (base_seed + k) % 2**32, tokens))
    runner.prepare([(prompt, tokens) for _, _, prompt, _, tokens in jobs])
    for cat in suite.categories:  # fail before running anything
        for policy in policies:
            effective = apply_override(policy, cat.policy_override)
            if not runner.serves(effective) and not runner.serves(policy):
                raise InputError(runner.unserved(policy))
    if reference and not runner.serves(observe):
        raise InputError(
            f"--addr: the daemon does not serve the observe-only policy {observe.name!r} "
            f"used for the unguarded reference runs; put {observe.name}.toml holding the "
            f'line name = "{observe.name}" in its --policies-dir, or pass --no-reference'
        )
    out: list[CellRun] = []
    scored: dict[Prompt, list[float] | None] = {}  # each prompt's nll, measured once
    for cat, maybe_policy, prompt, seed, tokens in jobs:
        sampling = sampling_for(cat, seed)
        if maybe_policy is None:
            run = runner.run(prompt, sampling, tokens, observe)
            if prompt not in scored:  # in process only: for the guards-alone table
                scored[prompt] = runner.prompt_nll(prompt)
            run.prompt_nll = scored[prompt]
            out.append(CellRun(cat, observe, observe, run, reference=True))
            note = f"{cat.name} / unguarded"
        else:
            policy = maybe_policy
            effective = apply_override(policy, cat.policy_override)
            if runner.serves(effective):
                run = runner.run(prompt, sampling, tokens, effective)
            else:
                run = _replayed(runner.run(prompt, sampling, tokens, policy), effective)
            out.append(CellRun(cat, policy, effective, run))
            note = f"{cat.name} / {policy.name}"
        if progress is not None:
            progress.advance(note)
    return out


def _replayed(run: Run, policy: Policy) -> Run:
    """The verdict `policy` reaches on the released steps of a run made under another."""
    run.replayed = True
    run.policy = policy.name
    trip = replay(run.steps, policy)
    if trip is None:
        return run
    cut = trip.token_index
    run.status = "halted"
    run.guard, run.value, run.threshold, run.token_index = (
        trip.guard,
        trip.value,
        trip.threshold,
        cut,
    )
    run.steps = run.steps[:cut]
    run.pieces = run.pieces[:cut]
    run.text = "".join(run.pieces)
    run.tokens = cut
    return run


def run_count(suite: Suite, policies: Sequence[Policy], seeds: int, reference: bool) -> int:
    """How many runs run_suite makes (for the progress bar)."""
    return sum(len(c.prompts) for c in suite.categories) * (len(policies) + reference) * seeds


def report_doc(
    cells: Sequence[CellRun],
    suite: Suite,
    policies: Sequence[Policy],
    runner: Runner,
    *,
    seeds: int,
    base_seed: int,
    max_tokens: int | None,
    seconds: float,
    command: str,
    plots: bool,
) -> dict[str, Any]:
    """report.json's document: meta, policies, categories, rows, rates and every run."""
    rows = table_rows(cells, suite, policies)
    budgets = sorted({max_tokens or c.max_tokens or suite.max_tokens for c in suite.categories})
    return {
        "meta": {
            "suite": suite.name,
            "suite_source": suite.source,
            "model": runner.model_name,
            "where": runner.where,
            "runs": sum(1 for c in cells if not c.reference),
            "reference_runs": sum(1 for c in cells if c.reference),
            "seeds": seeds,
            "base_seed": base_seed,
            "max_tokens_text": "/".join(str(b) for b in budgets),
            "seconds": round(seconds, 1),
            "command": command,
            "plots": plots,
        },
        "policies": [{"name": p.name, "sha256": p.sha256, "toml": p.to_toml()} for p in policies],
        "categories": [dataclasses.asdict(c) for c in suite.categories],
        "rows": rows,
        "rates": rates(rows, policies),
        "input_rows": input_rows(cells, suite, policies),
        "alone": alone_rows(cells, suite, policies),
        "runs": [run_json(c) for c in cells if not c.reference],
        "reference_runs": [run_json(c) for c in cells if c.reference],
    }


def write_reports(out: Path, doc: dict[str, Any], suite: Suite, policies: Sequence[Policy]) -> None:
    """report.json and report.md into `out` (a write failure names --out)."""
    text = json.dumps(_clean(doc), ensure_ascii=False, indent=1) + "\n"
    write_atomic(out / "report.json", text, "--out")
    write_atomic(out / "report.md", render_markdown(doc, suite, policies), "--out")
