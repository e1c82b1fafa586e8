"""The report of `fse experiment`: one row per category x policy, the catch and
false-halt rates, report.md, and each run as JSON."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fse.core.registry import GUARDS, spec
from fse.core.types import L2_NORM, PERPLEXITY
from fse.tools.runner import replay, steps_json

if TYPE_CHECKING:
    from fse.core.policy import Policy
    from fse.tools.experiment.suite import Category, CellRun, Suite

ARMED_FROM = 3  # first token index counted in the ranges (the perplexity guard's default arming)


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


def _observed(cr: CellRun, guard: str) -> list[float]:
    """The guard's metric over released tokens from ARMED_FROM on, plus the value that
    tripped the guard when it halted the run."""
    metric = spec(guard).metric
    assert metric is not None, guard
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
            ppl = [v for c in group for v in _observed(c, PERPLEXITY)]
            l2 = [v for c in group for v in _observed(c, L2_NORM)]
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


def input_rows(
    cells: Sequence[CellRun], suite: Suite, policies: Sequence[Policy]
) -> list[dict[str, Any]]:
    """The input-guard table: per category marked `input` x policy, how many runs a
    prompt guard refused before the first token, and how many went on to generate."""
    prompt_guards = {g.name for g in GUARDS if g.judge_prompt is not None}
    rows = []
    for cat in suite.categories:
        if not cat.input:
            continue
        for policy in policies:
            group = [c for c in cells if c.category is cat and c.policy is policy]
            refused = sum(1 for c in group if c.run.halted and c.run.guard in prompt_guards)
            values = [
                c.run.value
                for c in group
                if c.run.guard in prompt_guards and c.run.value is not None
            ]
            rows.append(
                {
                    "category": cat.name,
                    "title": cat.title,
                    "expect": cat.expect,
                    "policy": policy.name,
                    "runs": len(group),
                    "refused": refused,
                    "passed": len(group) - refused,
                    "refused_values": _range(values),
                }
            )
    return rows


def alone_rows(
    cells: Sequence[CellRun], suite: Suite, policies: Sequence[Policy]
) -> list[dict[str, Any]]:
    """What each guard alone would halt, replayed on the unguarded reference runs (the
    same trajectories for every guard), with the settings of the first compared policy
    that enables it, else its defaults: guards that are off everywhere (entropy) and
    detectors side by side (loop and near_loop) on the same text. Prompt guards judge
    the prompt's nll where it was measured (in process). Empty without reference runs."""
    from fse.core.policy import Policy

    refs = [c for c in cells if c.reference]
    if not refs:
        return []
    alone: dict[str, tuple[Policy, str]] = {}
    for g in GUARDS:
        cfg = next((getattr(p, g.name) for p in policies if getattr(p, g.name)), None)
        source = (
            "defaults"
            if cfg is None
            else next(p.name for p in policies if getattr(p, g.name) == cfg)
        )
        cfg = dataclasses.replace(cfg or g.config(), action="halt")
        alone[g.name] = (Policy(name=f"only-{g.name}", **{g.name: cfg}), source)
    rows = []
    for cat in suite.categories:
        group = [c.run for c in refs if c.category is cat]
        halts: dict[str, int] = {}
        for name, (policy, _) in alone.items():
            trips = [replay(r.steps, policy, r.prompt_nll) for r in group]
            halts[name] = sum(1 for t in trips if t is not None and t.guard == name)
        rows.append(
            {
                "category": cat.name,
                "title": cat.title,
                "expect": cat.expect,
                "runs": len(group),
                "would_halt": halts,
                "settings": {
                    n: f"{spec(n).summary(getattr(p, n))} ({src})" for n, (p, src) in alone.items()
                },
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
    """Each guard's settings in a phrase (the registry's summary), then non_finite."""
    parts = [spec(name).summary(cfg) for name, cfg in policy.guards().items()]
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
    lines += _input_table(doc)
    lines += _alone_table(doc)
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


def _input_table(doc: dict[str, Any]) -> list[str]:
    rows = doc.get("input_rows") or []
    if not rows:
        return []
    lines = [
        "",
        "## The input guard",
        "",
        "Prompts judged once, after prefill, before the first token: *refused* runs were "
        "stopped by a prompt guard with no token generated.",
        "",
        "| Category | Expect | Policy | Refused | Passed the prompt | Value that refused |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_md_cell(r['title'])} | {r['expect']} | {r['policy']} | "
            f"{r['refused']}/{r['runs']} | {r['passed']}/{r['runs']} | {r['refused_values']} |"
        )
    return lines


def _alone_table(doc: dict[str, Any]) -> list[str]:
    rows = doc.get("alone") or []
    if not rows:
        return []
    names = list(rows[0]["would_halt"])
    lines = [
        "",
        "## Each guard alone",
        "",
        "What each guard would halt on its own, replayed on the unguarded reference runs "
        "(the same text for every guard): guards off in every compared policy, and "
        "detectors side by side. A prompt guard is judged on the prompt's own nll.",
        "",
        "| Category | Expect | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = " | ".join(f"{r['would_halt'][n]}/{r['runs']}" for n in names)
        lines.append(f"| {_md_cell(r['title'])} | {r['expect']} | {cells} |")
    lines += ["", "Settings: " + "; ".join(rows[0]["settings"].values()) + "."]
    return lines


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
