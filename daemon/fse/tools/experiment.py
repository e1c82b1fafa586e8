"""`fse experiment`: what the guards catch and what they let through, on this model.

Runs a prompt suite (``fse/data/suite.toml`` by default, ``--suite FILE`` for your
own) whose categories follow the original status report, under every policy
compared (``--policy``, repeatable; default ``default`` and ``pro``), every prompt
with several seeds, and writes into ``--out DIR``:

- ``report.md``: one row per category x policy (outcome, guard that fired, token
  index, windowed-perplexity range, L2 range), then catch and false-halt rates;
- ``report.json``: the same rows, the rates, and every run with its raw per-step
  metrics (column-wise: index, token, nll, ppl, variance, max_prob, l2_norm);
- ``ppl.png``: windowed perplexity per token, one panel per category, log scale,
  the report's health bands (200, 400) shaded, halts marked;
- ``metrics.png``: logit variance, max probability and L2 norm the same way (one row
  per category), with each policy's thresholds drawn.

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fse.cli.common import add_local_flags, resolve_policy
from fse.core.errors import InputError
from fse.tools.calibrate import (
    EXIT_ERROR,
    EXIT_USAGE,
    OBSERVE_POLICY,
    CommandError,
    Progress,
    Prompt,
    Run,
    RunError,
    Runner,
    open_runner,
    replay,
    steps_json,
    write_atomic,
)

if TYPE_CHECKING:
    from fse.core.policy import Policy
    from fse.core.types import Sampling

DEFAULT_POLICIES = ("default", "pro")
DEFAULT_OUT = "fse-experiment"
DEFAULT_MAX_TOKENS = 96
DEFAULT_SEEDS = 3
ARMED_FROM = 3  # first token index counted in the ranges (the perplexity guard's default arming)
HEALTH_GREEN = 200.0  # the report's health bands, shaded in ppl.png
HEALTH_RED = 400.0
DPI = 100

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_EXPECT = ("halt", "pass")
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")


# ---------------------------------------------------------------------------
# The suite


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    title: str
    expect: str  # "halt" | "pass"
    prompts: tuple[str, ...]
    description: str = ""
    sampling: dict[str, float] = field(default_factory=dict)  # overrides of Sampling()
    max_tokens: int | None = None
    policy_override: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    categories: tuple[Category, ...]
    description: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    seeds: int = DEFAULT_SEEDS
    source: str = ""


class SuiteError(CommandError):
    """An invalid suite file; the message names the file and the key."""


def builtin_suite() -> Suite:
    resource = resources.files("fse") / "data" / "suite.toml"
    return parse_suite(resource.read_text(encoding="utf-8"), "<built-in suite.toml>")


def load_suite(path: Path) -> Suite:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise SuiteError(f"--suite: {path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SuiteError(f"--suite: {path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return parse_suite(text, str(path))


def parse_suite(text: str, source: str) -> Suite:
    """Parse and validate a suite; errors read '--suite: SOURCE: key: what is accepted'."""
    where = f"--suite: {source}"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{where}: invalid TOML: {exc}") from None

    def fail(key: str, message: str) -> SuiteError:
        return SuiteError(f"{where}: {key}: {message}")

    _unknown(doc, ("name", "description", "max_tokens", "seeds", "category"), "", fail)
    name = _str(doc.get("name", Path(source).stem), "name", fail)
    description = _str(doc.get("description", ""), "description", fail, empty=True)
    max_tokens = _int(doc.get("max_tokens", DEFAULT_MAX_TOKENS), "max_tokens", 1, 8192, fail)
    seeds = _int(doc.get("seeds", DEFAULT_SEEDS), "seeds", 1, 1000, fail)
    raw = doc.get("category")
    if not isinstance(raw, list) or not raw:
        raise fail("category", "expected at least one [[category]] table")
    categories: list[Category] = []
    for i, cat in enumerate(raw):
        key = f"category[{i}]"
        if not isinstance(cat, dict):
            raise fail(key, "expected a table")
        _unknown(
            cat,
            (
                "name",
                "title",
                "expect",
                "description",
                "prompts",
                "sampling",
                "max_tokens",
                "policy_override",
            ),
            key,
            fail,
        )
        if "name" not in cat:
            raise fail(f"{key}.name", "missing")
        cname = _str(cat["name"], f"{key}.name", fail)
        if not _ID_RE.fullmatch(cname):
            raise fail(
                f"{key}.name", f"{cname!r} is not accepted; accepted: [A-Za-z0-9_.-]{{1,64}}"
            )
        if any(c.name == cname for c in categories):
            raise fail(f"{key}.name", f"{cname!r} is used twice; names must be unique")
        expect = cat.get("expect")
        if expect not in _EXPECT:
            raise fail(f"{key}.expect", f'{expect!r} is not accepted; accepted: "halt", "pass"')
        prompts = cat.get("prompts")
        if (
            not isinstance(prompts, list)
            or not prompts
            or not all(isinstance(p, str) and p.strip() for p in prompts)
        ):
            raise fail(f"{key}.prompts", "expected a non-empty list of non-empty strings")
        sampling = _sampling(cat.get("sampling", {}), f"{key}.sampling", fail)
        cmax = cat.get("max_tokens")
        if cmax is not None:
            cmax = _int(cmax, f"{key}.max_tokens", 1, 8192, fail)
        override = _override(cat.get("policy_override", {}), f"{key}.policy_override", fail)
        categories.append(
            Category(
                name=cname,
                title=_str(cat.get("title", cname), f"{key}.title", fail),
                expect=str(expect),
                prompts=tuple(prompts),
                description=_str(cat.get("description", ""), f"{key}.description", fail, True),
                sampling=sampling,
                max_tokens=cmax,
                policy_override=override,
            )
        )
    return Suite(name, tuple(categories), description, max_tokens, seeds, source)


def _unknown(doc: dict[str, Any], accepted: Sequence[str], prefix: str, fail: Any) -> None:
    for key in doc:
        if key not in accepted:
            dotted = f"{prefix}.{key}" if prefix else key
            raise fail(dotted, f"unknown key; accepted: {', '.join(sorted(accepted))}")


def _str(value: object, key: str, fail: Any, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise fail(key, "expected a non-empty string" if not empty else "expected a string")
    return value


def _int(value: object, key: str, low: int, high: int, fail: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fail(key, f"{value!r} is not accepted; accepted: integer {low}..{high}")
    return value


def _sampling(value: object, key: str, fail: Any) -> dict[str, float]:
    from fse.core.types import Sampling

    if not isinstance(value, dict):
        raise fail(key, "expected a table")
    _unknown(value, _SAMPLING_KEYS, key, fail)
    out: dict[str, float] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise fail(f"{key}.{k}", f"expected a number, got {v!r}")
        if k == "top_k" and not isinstance(v, int):
            raise fail(f"{key}.{k}", f"expected an integer, got {v!r}")
        out[k] = v
    try:
        Sampling(**out).validate()  # type: ignore[arg-type]
    except ValueError as exc:
        raise fail(f"{key}.{exc}".split(":")[0], str(exc).partition(": ")[2]) from None
    return out


def _guard_types() -> dict[str, type[Any]]:
    from fse.core.policy import (
        L2NormGuard,
        LogitVarianceGuard,
        LoopGuard,
        MaxProbGuard,
        PerplexityGuard,
    )

    return {
        "perplexity": PerplexityGuard,
        "l2_norm": L2NormGuard,
        "logit_variance": LogitVarianceGuard,
        "max_prob": MaxProbGuard,
        "loop": LoopGuard,
    }


def _override(value: object, key: str, fail: Any) -> dict[str, dict[str, Any]]:
    from fse.core.policy import PolicyError

    types = _guard_types()
    if not isinstance(value, dict):
        raise fail(key, "expected a table of guard tables")
    _unknown(value, tuple(types), key, fail)
    for guard, table in value.items():
        if not isinstance(table, dict):
            raise fail(f"{key}.{guard}", "expected a table")
        accepted = [f.name for f in dataclasses.fields(types[guard])]
        _unknown(table, accepted, f"{key}.{guard}", fail)
        try:
            types[guard](**table)
        except PolicyError as exc:
            raise fail(key, str(exc)) from None
    return value


def apply_override(policy: Policy, override: dict[str, dict[str, Any]]) -> Policy:
    """`policy` with the override's guard tables merged in (a guard that is off is turned
    on with its defaults first). Same name; the sha256 follows the content."""
    if not override:
        return policy
    types = _guard_types()
    changes: dict[str, Any] = {}
    for guard, table in override.items():
        current = getattr(policy, guard) or types[guard]()
        changes[guard] = dataclasses.replace(current, **table)
    return dataclasses.replace(policy, **changes)


def sampling_for(category: Category, seed: int) -> Sampling:
    from fse.core.types import Sampling

    return dataclasses.replace(Sampling(**category.sampling), seed=seed)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Running the suite


@dataclass(slots=True)
class CellRun:
    category: Category
    policy: Policy  # the policy as compared (the row's label); the observe-only one for references
    effective: Policy  # with the category's override applied
    run: Run
    reference: bool = False  # an unguarded run (plots only)


def observe_policy() -> Policy:
    """No configurable guard (non_finite stays on): the unguarded reference runs."""
    from fse.core.policy import Policy

    return Policy(name=OBSERVE_POLICY)


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
                raise CommandError(runner.unserved(policy))
    if reference and not runner.serves(observe):
        raise CommandError(
            f"--addr: the daemon does not serve the observe-only policy {OBSERVE_POLICY!r} "
            f"used for the unguarded reference runs; put {OBSERVE_POLICY}.toml holding the "
            f'line name = "{OBSERVE_POLICY}" in its --policies-dir, or pass --no-reference'
        )
    out: list[CellRun] = []
    for cat, maybe_policy, prompt, seed, tokens in jobs:
        sampling = sampling_for(cat, seed)
        if maybe_policy is None:
            run = runner.run(prompt, sampling, tokens, observe)
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


# ---------------------------------------------------------------------------
# Rows and rates


def _num(x: float) -> str:
    """Three significant digits, thousands separated; 1e6 and up in e-notation."""
    if not math.isfinite(x):
        return "inf" if x > 0 else "n/a"
    if abs(x) >= 1e6:
        return f"{x:.2e}".replace("e+0", "e").replace("e+", "e")
    if abs(x) >= 1000:
        return f"{round(x):,}"
    return f"{x:.3g}"


def _range(values: Sequence[float]) -> str:
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return _num(lo) if _num(lo) == _num(hi) else f"{_num(lo)}\u2013{_num(hi)}"


def _observed(cr: CellRun, metric: str, guard: str) -> list[float]:
    run = cr.run
    values = [float(getattr(m, metric)) for m in run.steps if m.index >= ARMED_FROM]
    if run.halted and run.guard == guard and run.value is not None:
        values.append(run.value)
    return values


def table_rows(
    cells: Sequence[CellRun], suite: Suite, policies: Sequence[Policy]
) -> list[dict[str, Any]]:
    """One row per category x policy, in suite order; string fields are the table cells."""
    rows: list[dict[str, Any]] = []
    for cat in suite.categories:
        for policy in policies:
            group = [c for c in cells if c.category is cat and c.policy is policy]
            n = len(group)
            halted = [c for c in group if c.run.halted]
            passed = sum(1 for c in group if c.run.status == "completed")
            other = n - len(halted) - passed
            guards: dict[str, int] = {}
            for c in halted:
                g = c.run.guard or "unknown"
                guards[g] = guards.get(g, 0) + 1
            outcome = f"halted {len(halted)}/{n}" if halted else f"passed {passed}/{n}"
            if other:
                outcome += f", error {other}/{n}"
            indices = [c.run.token_index for c in halted if c.run.token_index is not None]
            ppl = [v for c in group for v in _observed(c, "ppl", "perplexity")]
            l2 = [v for c in group for v in _observed(c, "l2_norm", "l2_norm")]
            expected = len(halted) if cat.expect == "halt" else passed
            rows.append(
                {
                    "category": cat.name,
                    "title": cat.title,
                    "expect": cat.expect,
                    "policy": policy.name,
                    "runs": n,
                    "halted": len(halted),
                    "completed": passed,
                    "other": other,
                    "as_expected": expected,
                    "guard_counts": dict(sorted(guards.items())),
                    "token_indices": sorted(indices),
                    "outcome": outcome,
                    "guards": ", ".join(f"{g} \u00d7{k}" for g, k in sorted(guards.items())) or "—",
                    "token_index": _range([float(i) for i in indices]),
                    "ppl_range": _range(ppl),
                    "l2_range": _range(l2),
                    "ppl_min": min(ppl) if ppl else None,
                    "ppl_max": max(ppl) if ppl and math.isfinite(max(ppl)) else None,
                    "l2_min": min(l2) if l2 else None,
                    "l2_max": max(l2) if l2 else None,
                }
            )
    return rows


TABLE_COLUMNS = (
    ("Category", "title"),
    ("Expect", "expect"),
    ("Policy", "policy"),
    ("Outcome", "outcome"),
    ("Guard fired", "guards"),
    ("Token index", "token_index"),
    ("Windowed ppl", "ppl_range"),
    ("L2 norm", "l2_range"),
)


def rates(rows: Sequence[dict[str, Any]], policies: Sequence[Policy]) -> list[dict[str, Any]]:
    out = []
    for policy in policies:
        mine = [r for r in rows if r["policy"] == policy.name]
        bad = [r for r in mine if r["expect"] == "halt"]
        good = [r for r in mine if r["expect"] == "pass"]
        caught, n_bad = sum(r["halted"] for r in bad), sum(r["runs"] for r in bad)
        false, n_good = sum(r["halted"] for r in good), sum(r["runs"] for r in good)
        guards: dict[str, int] = {}
        for r in mine:
            for g, k in r["guard_counts"].items():
                guards[g] = guards.get(g, 0) + k
        out.append(
            {
                "policy": policy.name,
                "sha256": policy.sha256,
                "caught": caught,
                "should_halt": n_bad,
                "catch_rate": caught / n_bad if n_bad else None,
                "false_halts": false,
                "should_pass": n_good,
                "false_halt_rate": false / n_good if n_good else None,
                "halts_by_guard": dict(sorted(guards.items())),
            }
        )
    return out


def _rate(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.0%})" if n else "—"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def policy_summary(policy: Policy) -> str:
    parts = []
    for name, cfg in policy.guards().items():
        if name == "perplexity":
            parts.append(f"perplexity {cfg.threshold:g} (window {cfg.window})")  # type: ignore[union-attr]
        elif name == "l2_norm":
            parts.append(f"l2_norm {cfg.threshold:g}")  # type: ignore[union-attr]
        elif name == "logit_variance":
            parts.append(f"logit_variance {cfg.threshold:g}")  # type: ignore[union-attr]
        elif name == "max_prob":
            parts.append(f"max_prob {cfg.threshold:g} \u00d7 {cfg.consecutive}")  # type: ignore[union-attr]
        elif name == "loop":
            parts.append(f"loop {cfg.min_repeats} repeats / {cfg.min_span} tokens")  # type: ignore[union-attr]
    warn = [n for n, c in policy.guards().items() if c.action == "warn"]
    text = ", ".join(parts) + " + non_finite"
    return text + (f" (warn only: {', '.join(warn)})" if warn else "")


def _sampling_text(cat: Category) -> str:
    from fse.core.types import Sampling

    s = Sampling(**cat.sampling)  # type: ignore[arg-type]
    if s.temperature == 0:
        return "greedy"
    return f"temperature {s.temperature:g}, top_k {s.top_k}, top_p {s.top_p:g}, min_p {s.min_p:g}"


def render_markdown(doc: dict[str, Any], suite: Suite, policies: Sequence[Policy]) -> str:
    meta = doc["meta"]
    lines = [
        f"# Guard experiment: {suite.name} on {meta['model']}",
        "",
        f"{meta['runs']} runs: {len(suite.categories)} categories \u00d7 {len(policies)} policies, "
        f"every prompt with {meta['seeds']} seeds (seeds {meta['base_seed']}..), "
        f"up to {meta['max_tokens_text']} tokens each; {meta['where']}; "
        f"{meta['seconds']:.0f} s."
        + (
            f" Plus {meta['reference_runs']} unguarded reference runs (same prompts and seeds, "
            "no guard but non_finite), drawn in grey in the plots."
            if meta["reference_runs"]
            else ""
        ),
        "",
        f"Regenerate: `{meta['command']}`",
        "",
        "## Outcomes",
        "",
        "| " + " | ".join(h for h, _ in TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    for row in doc["rows"]:
        lines.append("| " + " | ".join(_md_cell(str(row[k])) for _, k in TABLE_COLUMNS) + " |")
    lines += [
        "",
        "Outcome: *halted k/n* when a guard stopped k of the n runs, *passed n/n* when every "
        "run completed (end of text or max tokens). Token index: the token the guard "
        "withheld (min\u2013max). Windowed ppl and L2 norm: min\u2013max over released tokens from "
        f"index {ARMED_FROM} on, plus the value that tripped the guard.",
        "",
        "## Catch and false-halt rates",
        "",
        "| Policy | Catch rate (expect halt) | False-halt rate (expect pass) | Halts by guard |",
        "|---|---|---|---|",
    ]
    for r in doc["rates"]:
        by_guard = ", ".join(f"{g} \u00d7{k}" for g, k in r["halts_by_guard"].items()) or "—"
        lines.append(
            f"| {r['policy']} | {_rate(r['caught'], r['should_halt'])} | "
            f"{_rate(r['false_halts'], r['should_pass'])} | {by_guard} |"
        )
    lines += _surprises(doc, suite)
    lines += ["", "## Policies", ""]
    for p in policies:
        lines.append(f"- `{p.name}` (sha256 `{p.sha256[:12]}`): {policy_summary(p)}")
    lines += ["", "## Categories", ""]
    for cat in suite.categories:
        extra = ""
        if cat.policy_override:
            extra = "; override " + ", ".join(
                f"{g}.{k} = {v}" for g, t in cat.policy_override.items() for k, v in t.items()
            )
        prompts = "; ".join(f"`{_md_cell(p)}`" for p in cat.prompts)
        desc = f" {cat.description}." if cat.description else ""
        lines.append(
            f"- **{cat.title}** (expect {cat.expect}; {_sampling_text(cat)}{extra}).{desc} "
            f"Prompts: {prompts}"
        )
    if doc["meta"].get("plots"):
        lines += [
            "",
            "## Plots",
            "",
            "![windowed perplexity](ppl.png)",
            "",
            "![metrics](metrics.png)",
        ]
    return "\n".join(lines) + "\n"


MAX_LISTED = 24  # runs listed per section of surprises


def _snippet(text: str, tail: bool, n: int = 70) -> str:
    flat = " ".join(text.split())
    cut = flat[-n:] if tail else flat[:n]
    shown = (
        ("…" if tail and len(flat) > n else "") + cut + ("…" if not tail and len(flat) > n else "")
    )
    return "`" + shown.replace("`", "'").replace("|", "\\|") + "`" if shown else "(nothing)"


def _which(run: dict[str, Any]) -> str:
    """'2, 3': the category's second prompt, seed 3."""
    index = run.get("prompt_index")
    return f"{index + 1}, {run['seed']}" if isinstance(index, int) else str(run["seed"])


def _surprises(doc: dict[str, Any], suite: Suite) -> list[str]:
    """Every halt where the category expects a pass, and every pass where it expects a halt,
    with the text around the decision, so a reader can judge each one."""
    expect = {c.name: c.expect for c in suite.categories}
    refs = {(r["category"], r["prompt"], r["seed"]): r for r in doc.get("reference_runs", [])}
    false_halts = [
        r for r in doc["runs"] if expect[r["category"]] == "pass" and r["status"] == "halted"
    ]
    misses = [
        r for r in doc["runs"] if expect[r["category"]] == "halt" and r["status"] == "completed"
    ]
    lines: list[str] = []
    if false_halts:
        lines += [
            "",
            "## Halts in categories expected to pass",
            "",
            "What was released before the halt, and what the unguarded run (same prompt and "
            "seed) wrote next:",
            "",
            "| Category | Policy | Prompt, seed | Guard at token | Released (end) "
            "| Unguarded next |",
            "|---|---|---|---|---|---|",
        ]
        for r in false_halts[:MAX_LISTED]:
            ref = refs.get((r["category"], r["prompt"], r["seed"]))
            after = ref["text"][len(r["text"]) :] if ref else ""
            lines.append(
                f"| {r['category']} | {r['policy']} | {_which(r)} | {r['guard']} at "
                f"{r['token_index']} | {_snippet(r['text'], tail=True)} | "
                f"{_snippet(after, tail=False) if ref else '—'} |"
            )
        if len(false_halts) > MAX_LISTED:
            lines.append(f"\n… and {len(false_halts) - MAX_LISTED} more (see report.json).")
    if misses:
        lines += [
            "",
            "## Passes in categories expected to halt",
            "",
            "| Category | Policy | Prompt, seed | Tokens | Output (end) |",
            "|---|---|---|---|---|",
        ]
        for r in misses[:MAX_LISTED]:
            lines.append(
                f"| {r['category']} | {r['policy']} | {_which(r)} | {r['tokens']} | "
                f"{_snippet(r['text'], tail=True)} |"
            )
        if len(misses) > MAX_LISTED:
            lines.append(f"\n… and {len(misses) - MAX_LISTED} more (see report.json).")
    return lines


def _json_num(x: float | None) -> float | None:
    return float(f"{x:.6g}") if x is not None and math.isfinite(x) else None


def run_json(cr: CellRun) -> dict[str, Any]:
    r = cr.run
    return {
        "category": cr.category.name,
        "policy": cr.policy.name,
        "policy_sha256": cr.effective.sha256,
        "prompt": r.prompt.text,
        "prompt_index": cr.category.prompts.index(r.prompt.text),
        "seed": r.seed,
        "status": r.status,
        "guard": r.guard,
        "value": _json_num(r.value),
        "threshold": _json_num(r.threshold),
        "token_index": r.token_index,
        "tokens": r.tokens,
        "text": r.text,
        "replayed": r.replayed,
        "seconds": round(r.seconds, 3),
        "steps": steps_json(r.steps),
    }


def _clean(doc: Any) -> Any:
    """JSON has no inf/NaN: replace them with null anywhere in the document."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _clean(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_clean(v) for v in doc]
    return doc


# ---------------------------------------------------------------------------
# Plots


GUARD_MARKERS = {
    "perplexity": "X",
    "loop": "o",
    "max_prob": "^",
    "l2_norm": "s",
    "logit_variance": "v",
    "non_finite": "D",
}
TRACE_COLOUR = "0.45"  # grey: the trajectories; colour belongs to the policies' halts


def ppl_figure_size(n_categories: int) -> tuple[int, int]:
    """Pixel size of ppl.png: up to two panels a row."""
    cols = min(2, n_categories)
    rows = -(-n_categories // cols)
    return 600 * cols, 300 * rows + 100


def metrics_figure_size(n_categories: int) -> tuple[int, int]:
    """Pixel size of metrics.png: one row per category, three metrics a row."""
    return 1500, 240 * n_categories + 100


def _halt_y(
    c: CellRun, metric: str, guard: str, refs: dict[tuple[str, str, int | None], Run]
) -> float | None:
    """Where to mark a halt on a `metric` panel: the value that tripped the guard when it
    measures this metric, else the metric at the halting token in the unguarded run,
    else the last released value; None when nothing is known (marked on the x axis)."""
    run = c.run
    if run.guard == guard and run.value is not None and math.isfinite(run.value):
        return run.value
    ref = refs.get((c.category.name, run.prompt.text, run.seed))
    if ref is not None and run.token_index is not None and run.token_index < len(ref.steps):
        return float(getattr(ref.steps[run.token_index], metric))
    if run.steps:
        return float(getattr(run.steps[-1], metric))
    return None


def _save_png(fig: Any, path: Path) -> None:
    """Save as a 256-colour palette PNG (line art: half the bytes, no visible change);
    Pillow comes with matplotlib. Same pixel size as the figure."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    buf.seek(0)
    with Image.open(buf) as image:
        palette = image.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        palette.save(tmp, format="PNG", optimize=True)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CommandError(f"--out: {path}: cannot write: {exc.strerror or exc}") from None


def write_plots(
    cells: Sequence[CellRun],
    suite: Suite,
    policies: Sequence[Policy],
    out: Path,
    max_tokens: int | None,
) -> None:
    """ppl.png and metrics.png (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colour = {p.name: f"C{i % 10}" for i, p in enumerate(policies)}
    # Concentric markers: with the same seed, several policies often halt on the same token.
    size = {p.name: max(4.0, 14.0 - 4.0 * i) for i, p in enumerate(policies)}
    guarded = [c for c in cells if not c.reference]
    refs = {(c.category.name, c.run.prompt.text, c.run.seed): c.run for c in cells if c.reference}
    has_refs = bool(refs)
    guards_seen = sorted({c.run.guard for c in guarded if c.run.halted and c.run.guard})
    trace_label = "unguarded run (same prompt and seed)" if has_refs else "released tokens"
    legend = [Line2D([], [], color=TRACE_COLOUR, label=trace_label)]
    legend += [
        Line2D([], [], color=colour[p.name], marker="o", linestyle="none", label=f"policy {p.name}")
        for p in policies
    ]
    legend += [
        Line2D(
            [], [], color="white", markeredgecolor="black", marker=GUARD_MARKERS.get(g, "*"),
            linestyle="none", label=f"halt: {g}",
        )
        for g in guards_seen
    ]  # fmt: skip

    def draw(ax: Any, cat: Category, metric: str, guard: str) -> None:
        traces = [c for c in cells if c.category is cat and c.reference == has_refs]
        for c in traces:
            xs = [m.index for m in c.run.steps]
            ys = [float(getattr(m, metric)) for m in c.run.steps]
            if metric == "ppl":  # before the guard arms, the window holds a few tokens only
                ax.plot(xs[: ARMED_FROM + 1], ys[: ARMED_FROM + 1], color=TRACE_COLOUR,
                        linewidth=0.8, alpha=0.25, linestyle=":")  # fmt: skip
                xs, ys = xs[ARMED_FROM:], ys[ARMED_FROM:]
            ax.plot(xs, ys, color=TRACE_COLOUR, linewidth=0.8, alpha=0.55)
        for c in guarded:
            if c.category is not cat or not c.run.halted or c.run.token_index is None:
                continue
            kw: dict[str, Any] = {
                "color": colour[c.policy.name],
                "marker": GUARD_MARKERS.get(c.run.guard or "", "*"),
                "markersize": size[c.policy.name],
                "markeredgecolor": "black",
                "markeredgewidth": 0.6,
                "linestyle": "none",
                "zorder": 5,
            }
            y = _halt_y(c, metric, guard, refs)
            if y is None:
                ax.plot([c.run.token_index], [0.03], transform=ax.get_xaxis_transform(), **kw)
            else:
                ax.plot([c.run.token_index], [y], **kw)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlim(-1, (max_tokens or cat.max_tokens or suite.max_tokens) + 1)

    n = len(suite.categories)

    # ppl.png
    w, h = ppl_figure_size(n)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    cols = min(2, n)
    axes = fig.subplots(-(-n // cols), cols, squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    ppl_values = [
        float(m.ppl) for c in cells for m in c.run.steps[ARMED_FROM:] if math.isfinite(m.ppl)
    ] + [c.run.value for c in guarded if c.run.guard == "perplexity" and c.run.value]
    for ax, cat in zip(axes.flat, suite.categories, strict=False):
        ax.set_yscale("log")
        ax.axhspan(1e-3, HEALTH_GREEN, color="tab:green", alpha=0.07, linewidth=0)
        ax.axhspan(HEALTH_GREEN, HEALTH_RED, color="gold", alpha=0.25, linewidth=0)
        ax.axhspan(HEALTH_RED, 1e30, color="tab:red", alpha=0.07, linewidth=0)
        for p in policies:
            eff = apply_override(p, cat.policy_override)
            if eff.perplexity is not None:
                ax.axhline(eff.perplexity.threshold, color=colour[p.name], linestyle="--", lw=0.9)
        draw(ax, cat, "ppl", "perplexity")
        ax.set_title(f"{cat.title} (expect {cat.expect})", fontsize=10)
        ax.set_xlabel("token")
        ax.set_ylabel("windowed perplexity")
    axes.flat[0].set_ylim(0.8, max([HEALTH_RED * 3, *ppl_values]) * 3)
    fig.suptitle(
        f"Windowed perplexity per token ({suite.name}): green < {HEALTH_GREEN:g}, "
        f"yellow {HEALTH_GREEN:g}\u2013{HEALTH_RED:g}, red > {HEALTH_RED:g}; dashed: each "
        "policy's threshold; markers: where a policy halted",
        fontsize=11,
    )
    fig.legend(handles=legend, loc="outside lower center", ncol=min(5, len(legend)), fontsize=9)
    _save_png(fig, out / "ppl.png")

    # metrics.png
    w, h = metrics_figure_size(n)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False)
    specs = (
        ("variance", "logit_variance", "logit variance", "log"),
        ("max_prob", "max_prob", "max probability", "linear"),
        ("l2_norm", "l2_norm", "L2 norm of logits", "log"),
    )
    for r, cat in enumerate(suite.categories):
        for col, (metric, guard, label, scale) in enumerate(specs):
            ax = axes[r][col]
            ax.set_yscale(scale)
            draw(ax, cat, metric, guard)
            configs = [
                (p, cfg)
                for p in policies
                if (cfg := getattr(apply_override(p, cat.policy_override), guard)) is not None
            ]
            if metric == "max_prob":
                ax.set_ylim(0, 1.02)
            else:
                vals = [
                    float(getattr(m, metric))
                    for c in cells
                    if c.category is cat
                    for m in c.run.steps
                ]
                vals += [
                    c.run.value
                    for c in guarded
                    if c.category is cat and c.run.guard == guard and c.run.value
                ]
                vals += [cfg.threshold for _, cfg in configs]
                finite = [v for v in vals if v > 0 and math.isfinite(v)]
                if finite:
                    ax.set_ylim(min(finite) / 2, max(finite) * 2)
            for p, cfg in configs:
                ax.axhline(cfg.threshold, color=colour[p.name], linestyle="--", linewidth=1)
                if guard == "logit_variance":
                    ax.axhspan(1e-30, cfg.threshold, color="tab:red", alpha=0.06, linewidth=0)
                else:
                    ax.axhspan(cfg.threshold, 1e30, color="tab:red", alpha=0.06, linewidth=0)
            if r == 0:
                ax.set_title(label, fontsize=11)
            if col == 0:
                ax.set_ylabel(f"{cat.title}\n(expect {cat.expect})", fontsize=9)
            if r == n - 1:
                ax.set_xlabel("token")
    fig.suptitle(
        f"Logit statistics per token ({suite.name}); dashed: each policy's threshold, "
        "red: the halting side; markers: where a policy halted",
        fontsize=11,
    )
    fig.legend(handles=legend, loc="outside lower center", ncol=min(5, len(legend)), fontsize=9)
    _save_png(fig, out / "metrics.png")


# ---------------------------------------------------------------------------
# The command


def add_parser(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "experiment",
        help="run the status-report prompt suite under policies; write a table and plots",
        description=(
            "Run a prompt suite (factual, creative, nonsense, loop, degeneration, simulated "
            "fault, ...) under each policy with several seeds, and write report.md, "
            "report.json, ppl.png and metrics.png into --out."
        ),
    )
    p.add_argument("--addr", help="daemon address (unix:PATH or HOST:PORT); default: in-process")
    p.add_argument(
        "--policy",
        action="append",
        metavar="NAME|FILE",
        help="policy to compare (repeatable; default: default and pro)",
    )
    p.add_argument("--policies-dir", type=Path, help="directory of extra NAME.toml policies")
    p.add_argument(
        "--suite", type=Path, help="suite TOML (default: the built-in status-report suite)"
    )
    p.add_argument(
        "--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory ({DEFAULT_OUT})"
    )
    p.add_argument("--seeds", type=int, help="seeds per prompt (default: the suite's, 3)")
    p.add_argument(
        "--seed", type=int, default=1, help="first seed; prompt runs use seed, seed+1, ... (1)"
    )
    p.add_argument(
        "--max-tokens", type=int, help="tokens per run at most (default: the suite's, 96)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip ppl.png and metrics.png")
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the unguarded reference runs drawn in the plots",
    )
    add_local_flags(p)
    p.set_defaults(func=cmd_experiment)


def cmd_experiment(args: argparse.Namespace) -> int:
    try:
        return _experiment(args)
    except (InputError, CommandError) as exc:
        print(f"fse experiment: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as exc:
        print(f"fse experiment: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out: {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fse-write-test-{id(out)}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CommandError(f"--out: {out}: not writable: {exc.strerror or exc}") from None


def _experiment(args: argparse.Namespace) -> int:
    if args.seeds is not None and not 1 <= args.seeds <= 1000:
        raise CommandError(f"--seeds: {args.seeds} is invalid; accepted: 1..1000")
    if args.max_tokens is not None and not 1 <= args.max_tokens <= 8192:
        raise CommandError(f"--max-tokens: {args.max_tokens} is invalid; accepted: 1..8192")
    if not 0 <= args.seed < 2**32:
        raise CommandError(f"--seed: {args.seed} is invalid; accepted: 0 <= seed < 2^32")
    suite = load_suite(args.suite) if args.suite is not None else builtin_suite()
    policies: list[Policy] = []
    for name in args.policy or DEFAULT_POLICIES:
        try:
            policy = resolve_policy(name, args.policies_dir)
        except InputError as exc:
            message = str(exc).removeprefix("--policy: ")
            raise CommandError(f"--policy: {message}") from None
        if any(p.name == policy.name for p in policies):
            raise CommandError(f"--policy: {name!r}: a policy named {policy.name!r} is given twice")
        policies.append(policy)
    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plots = False
            print(
                "fse experiment: matplotlib is not installed; writing the reports without "
                "ppl.png and metrics.png (pip install 'fse[plot]')",
                file=sys.stderr,
            )
    _prepare_out(args.out)
    seeds = args.seeds or suite.seeds

    started = time.monotonic()
    runner = open_runner(args)
    try:
        reference = not args.no_reference
        n_runs = sum(len(c.prompts) for c in suite.categories) * (len(policies) + reference) * seeds
        progress = Progress(n_runs, "experiment")
        cells = run_suite(
            runner,
            suite,
            policies,
            seeds=seeds,
            max_tokens=args.max_tokens,
            base_seed=args.seed,
            reference=reference,
            progress=progress,
        )
    finally:
        runner.close()
    seconds = time.monotonic() - started

    rows = table_rows(cells, suite, policies)
    budgets = sorted(
        {args.max_tokens or c.max_tokens or suite.max_tokens for c in suite.categories}
    )
    doc: dict[str, Any] = {
        "meta": {
            "suite": suite.name,
            "suite_source": suite.source,
            "model": runner.model_name,
            "where": runner.where,
            "runs": sum(1 for c in cells if not c.reference),
            "reference_runs": sum(1 for c in cells if c.reference),
            "seeds": seeds,
            "base_seed": args.seed,
            "max_tokens_text": "/".join(str(b) for b in budgets),
            "seconds": round(seconds, 1),
            "command": _command_line(args),
            "plots": plots,
        },
        "policies": [{"name": p.name, "sha256": p.sha256, "toml": p.to_toml()} for p in policies],
        "categories": [dataclasses.asdict(c) for c in suite.categories],
        "rows": rows,
        "rates": rates(rows, policies),
        "runs": [run_json(c) for c in cells if not c.reference],
        "reference_runs": [run_json(c) for c in cells if c.reference],
    }
    out: Path = args.out
    write_atomic(
        out / "report.json", json.dumps(_clean(doc), ensure_ascii=False, indent=1) + "\n", "--out"
    )
    write_atomic(out / "report.md", render_markdown(doc, suite, policies), "--out")
    if plots:
        write_plots(cells, suite, policies, out, args.max_tokens)
    print(summary_text(doc))
    written = ["report.md", "report.json"] + (["ppl.png", "metrics.png"] if plots else [])
    print(f"wrote {', '.join(str(out / f) for f in written)}")
    return 0


def summary_text(doc: dict[str, Any]) -> str:
    lines = []
    width = max(len(r["title"]) for r in doc["rows"])
    pw = max(len(r["policy"]) for r in doc["rows"])
    for r in doc["rows"]:
        lines.append(
            f"{r['title']:<{width}}  {r['expect']:<4}  {r['policy']:<{pw}}  {r['outcome']:<14} "
            f"{r['guards']}"
        )
    lines.append("")
    for r in doc["rates"]:
        lines.append(
            f"{r['policy']}: catch rate {_rate(r['caught'], r['should_halt'])}, "
            f"false-halt rate {_rate(r['false_halts'], r['should_pass'])}"
        )
    return "\n".join(lines)


def _command_line(args: argparse.Namespace) -> str:
    parts = ["fse", "experiment"]
    for p in args.policy or []:
        parts += ["--policy", p]
    if args.policies_dir is not None:
        parts += ["--policies-dir", str(args.policies_dir)]
    if args.suite is not None:
        parts += ["--suite", str(args.suite)]
    if args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.seed != 1:
        parts += ["--seed", str(args.seed)]
    if args.max_tokens is not None:
        parts += ["--max-tokens", str(args.max_tokens)]
    if args.no_reference:
        parts.append("--no-reference")
    if args.no_plots:
        parts.append("--no-plots")
    if args.addr:
        parts += ["--addr", args.addr]
    if args.model is not None:
        parts += ["--model", str(args.model)]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)
