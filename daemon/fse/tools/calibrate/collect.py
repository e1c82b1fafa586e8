"""Running the healthy generations: every prompt under the observe-only policy, in
process or through a daemon."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from fse.core.errors import InputError
from fse.tools.runner import Progress, Prompt, Run, RunError, Runner, observe_policy

if TYPE_CHECKING:
    from fse.core.types import Sampling


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
    Each prompt's own nll (for the prompt guards) is measured once, in process only.
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
    scored: dict[Prompt, list[float] | None] = {}  # once per prompt, whatever `samples`
    for i, (prompt, tokens) in enumerate(jobs):
        seed = (base_seed + i) % 2**32
        run = runner.run(prompt, replace(sampling, seed=seed), tokens, observe)
        if run.status == "error":
            raise RunError(f"{prompt.source}: generation failed: {run.message}")
        if prompt not in scored:
            scored[prompt] = runner.prompt_nll(prompt)
        run.prompt_nll = scored[prompt]
        runs.append(run)
        if bar is not None:
            bar.advance(prompt.label)
    return runs
