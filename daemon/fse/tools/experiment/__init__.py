"""`fse experiment`: what the guards catch and what they let through, on this model.

Runs a prompt suite (``fse/data/suite.toml`` by default, ``--suite FILE`` for your
own) whose categories follow the original status report, under every policy
compared (``--policy``, repeatable; default ``default`` and ``pro``), every prompt
with several seeds, and writes into ``--out DIR``:

- ``report.md``: one row per category x policy (outcome, guard that fired, token
  index, windowed-perplexity range, L2 range), then catch and false-halt rates;
- ``report.json``: the same rows, the rates, and every run with its raw per-step
  metrics (column-wise: index, token, nll, ppl, variance, max_prob, l2_norm, entropy);
- ``ppl.png``: windowed perplexity per token, one panel per category, log scale,
  the report's health bands (200, 400) shaded, halts marked;
- ``metrics.png``: the metric of every guard that has a panel in fse.core.registry
  (L2 norm, logit variance, max probability) the same way, one row per category, with
  each policy's thresholds drawn.

Every prompt and seed also runs once unguarded (an observe-only policy: no guard but
non_finite) unless ``--no-reference``: with the same seed the guarded runs follow the
same trajectory until they halt, so the plots draw the unguarded trajectory in grey
(what the model does) and mark, in each policy's colour, the token where that policy
halted (what the guards stop). Reference runs are kept apart in report.json and count
in no rate.

The plots need matplotlib (``pip install fse[plot]``); without it the two reports are
written and a notice says how to get the pictures.

Definitions:

- A run *halts* when its verdict is ``halted`` (any guard, including ``deadline``); it
  *passes* when it is ``completed`` (end of generation or max tokens). ``error`` and
  ``cancelled`` runs count in neither and are shown in the outcome.
- Catch rate = halted / runs in categories with ``expect = "halt"``; false-halt rate =
  halted / runs in categories with ``expect = "pass"``; both per policy.
- Ranges in the table are over released tokens from the fourth one on (index >= 3,
  where the perplexity guard arms by default) plus the value that tripped the guard
  when that guard measures the same metric (the halting token is withheld, so its
  metrics come only from the verdict).
- A category's ``policy_override`` (e.g. the simulated fault: ``l2_norm`` threshold
  10) is merged into every compared policy for that category's runs only; the
  policy keeps its name, its sha256 changes.

In-process by default; with ``--addr`` through the daemon, which serves policies by
name: a ``--policy`` file must be installed in the daemon's policies directory (same
name and sha256, checked with GetInfo). A category whose override makes a policy the
daemon does not serve runs under the served base policy and its verdict is found by
replaying the released metrics through a local guard chain of the overridden policy
(exact up to the daemon's own halt); such runs are marked ``replayed`` in report.json.

Suite file (TOML)::

    name = "my-suite"
    max_tokens = 96                 # per run (default 96)
    seeds = 3                       # per prompt (default 3)
    [[category]]
    name = "factual"                # [A-Za-z0-9_.-]+, unique
    title = "factual"               # shown in the table (default: name)
    expect = "pass"                 # or "halt"
    description = "..."             # optional
    prompts = ["The capital of France is"]
    sampling = { temperature = 0.8, top_k = 40, top_p = 0.95, min_p = 0.05 }  # optional
    max_tokens = 64                 # optional, this category only
    policy_override = { l2_norm = { threshold = 10.0 } }                       # optional
    input = true                    # optional: the category is about the prompt itself

report.md also holds, after the rates: *The input guard* (categories with ``input =
true``, per policy: runs a prompt guard refused before the first token, and runs that
went on), and *Each guard alone* (every guard of the registry replayed on its own over
the unguarded reference runs, with the first compared policy's settings or its
defaults: what a guard that is off everywhere, such as entropy, would catch, and the
exact and approximate loop detectors side by side; prompt guards judge the prompt's
own nll, measured in process only).

The package: ``suite`` (the suite file), ``run`` (running it, the report document),
``report`` (rows, rates, report.md), ``plots`` (the two pictures). The flags are parsed
by fse.cli.experiment.
"""

from fse.tools.experiment.plots import (
    GUARD_MARKERS,
    metrics_figure_size,
    ppl_figure_size,
    write_plots,
)
from fse.tools.experiment.report import (
    ARMED_FROM,
    TABLE_COLUMNS,
    policy_summary,
    rates,
    render_markdown,
    run_json,
    summary_text,
    table_rows,
)
from fse.tools.experiment.run import report_doc, run_count, run_suite, write_reports
from fse.tools.experiment.suite import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SEEDS,
    Category,
    CellRun,
    Suite,
    SuiteError,
    apply_override,
    builtin_suite,
    load_suite,
    parse_suite,
    sampling_for,
)

__all__ = [
    "ARMED_FROM",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SEEDS",
    "GUARD_MARKERS",
    "TABLE_COLUMNS",
    "Category",
    "CellRun",
    "Suite",
    "SuiteError",
    "apply_override",
    "builtin_suite",
    "load_suite",
    "metrics_figure_size",
    "parse_suite",
    "policy_summary",
    "ppl_figure_size",
    "rates",
    "render_markdown",
    "report_doc",
    "run_count",
    "run_json",
    "run_suite",
    "sampling_for",
    "summary_text",
    "table_rows",
    "write_plots",
    "write_reports",
]
