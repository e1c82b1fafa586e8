"""`fse calibrate`: thresholds measured on the operator's own model.

The thresholds of the original status report were measured on TinyLlama 1.1B. Some
metrics mean the same on every model and some do not: logits are log-probabilities
up to an additive constant, so anything derived from probabilities (perplexity, max
probability) or from differences of logits (variance, in nats squared) is comparable
across models, while the L2 norm of the raw logit vector depends on the model's
logit scale and offset (TinyLlama ~380, Gemma 3 270M 2,000-6,000). Calibration
runs healthy generations at the operator's sampling settings, records every metric
at every step, and writes a policy whose thresholds sit at stated quantiles of that
healthy distribution times a margin, clamped to hard limits.

How a threshold is chosen (q = ``--quantile``, default 0.999; m = ``--margin``,
default 1.5; base = the guards of ``--policy``, default ``pro``):

- perplexity: max(p_q(windowed ppl of armed steps) x m, 100); limit: <= 400.
- l2_norm: p_q(L2 norm) x m; limit: <= 100 x sqrt(n_vocab).
- logit_variance: p_(1-q)(variance) / m; limit: >= 0.1.
- loop: min_repeats and max_period are kept; min_span = 1 + p_q(longest tail cycle
  of >= min_repeats repeats, per non-looping generation), at least the base's;
  limit: <= 32.
- max_prob: the threshold is kept (0.99); consecutive = 1 + p_q(longest run above it,
  per non-looping generation), at least the base's; limit: <= 32.
- non_finite: always on (not configurable).

Why these limits:

- perplexity <= 400: perplexity is a statement about probabilities, so the report's
  red line means the same on any model: the model gives its own tokens less than
  1/400 of probability on average over the window. Calibration may tighten the guard
  (Gemma 3 270M's healthy text: p99.9 about 22) but never past that line. The floor of 100
  keeps a narrow or greedy corpus from producing a hair trigger; a floor, unlike the
  limit, is only a default and may be below the data (then the report warns).
- l2_norm <= 100 x sqrt(n_vocab): the norm scales with the model, so the only limit
  that holds for every model is physical: a logit vector whose RMS exceeds 100 nats
  puts every token but the top ones below exp(-100), beneath float32's normal range;
  the distribution no longer carries information.
- logit_variance >= 0.1: logits are in nats, so a variance of 0.1 nats^2 (a spread
  of about 0.3 nats) is a nearly flat distribution on any model: collapse.
- max_prob <= 1 is enforced by the policy itself; the 0.99 threshold is kept (the
  report's finding: rarely exceeded, even in loops) and only the run length adapts.
- loop and max_prob are event guards, judged per generation (with few generations
  p_q is their maximum): their base values (3 repeats over 12 tokens, 0.99 for 8
  steps) are the smallest the design trusts, so calibration only raises them, to one
  above the healthy maximum (the tightest setting under which every healthy
  generation passes; a multiplicative margin on a count of tokens would loosen them
  far more than the continuous thresholds), and never above 32 tokens or steps. A
  generation whose tail cycle covers 32 tokens or more is a loop by that limit, whatever the
  corpus says: small models loop in ordinary generations (Gemma 3 270M: 9 of the 40
  built-in prompts at 128 tokens), and letting those set the threshold would switch
  the guard off. Such generations are left out of the loop and max_prob statistics,
  counted as halts in the expected false-halt rate and listed for the operator to read.
- non_finite stays on: it is not configurable.

Upper quantiles use numpy's "higher" method and lower ones "lower" (the result is an
observed value, never an interpolation past the data). Thresholds are rounded to
three significant digits in the looser direction, then clamped to the limits.
Health bands: red_above = the perplexity threshold, green_below = min(the base
policy's green_below, half of it) (the report's 200/400 ratio).

Expected false-halt rate: every calibration generation is replayed, step by step,
through a fresh GuardChain of the written policy (windowed perplexity recomputed from
the recorded nll for the policy's window); the rate is the fraction that any halting
guard would have stopped.

Data collection runs each generation under an observe-only policy (no configurable
guard; non_finite stays on), so every step's metrics come back in TokenEvent.metrics.
In-process by default; with ``--addr`` through the daemon, which must then serve such
a policy under the name ``calibration`` (a file ``calibration.toml`` holding just
``name = "calibration"`` in its --policies-dir). The token that ends a generation
(end of generation) is not released, so its metrics are not part of the data.

Corpus (``--corpus``): a text file holds one prompt per line (blank lines skipped); a
``.jsonl``/``.ndjson`` file holds one JSON object per line with either ``"prompt"``
(a string) or ``"messages"`` (a list of ``{"role", "content"}``, rendered with the
model's chat template). Without ``--corpus`` the built-in prompt set
(``fse/data/calibration_prompts.txt``, 40 everyday prompts) is used.

This module also holds the pieces `fse experiment` shares: the local and remote
runners, replay, and the progress bar.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

from fse.cli.common import (
    add_generation_flags,
    add_local_flags,
    load_model,
    resolve_policy,
    sampling_from_args,
)
from fse.core.errors import InputError

if TYPE_CHECKING:
    from fse.core.engine import Context, Model
    from fse.core.policy import Policy
    from fse.core.types import Request, Sampling, StepMetrics, Trip

EXIT_USAGE = 2
EXIT_ERROR = 1

QUANTILE = 0.999
MARGIN = 1.5
PPL_FLOOR = 100.0
PPL_CEILING = 400.0
L2_RMS_CEILING = 100.0  # nats; the L2 limit is this times sqrt(n_vocab)
VARIANCE_FLOOR = 0.1
MAX_PROB_CONSECUTIVE_CEILING = 32
LOOP_SPAN_CEILING = 32
OBSERVE_POLICY = "calibration"  # the observe-only policy a daemon must serve for --addr
DEFAULT_MAX_TOKENS = 128

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class CommandError(Exception):
    """Bad input found by this module: one line, exit 2."""


class RunError(Exception):
    """A generation could not run (the daemon is unreachable, llama.cpp failed): exit 1."""


# ---------------------------------------------------------------------------
# Prompts and corpora


@dataclass(frozen=True, slots=True)
class Prompt:
    """A raw prompt or chat messages, and where it came from (for messages)."""

    text: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    source: str = ""  # e.g. "corpus.jsonl:3"

    @property
    def label(self) -> str:
        shown = self.text if self.text else " / ".join(c for _, c in self.messages)
        shown = " ".join(shown.split())
        return shown if len(shown) <= 60 else shown[:57] + "..."


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
    """Prompts of a corpus file; any problem is a CommandError naming flag, file and line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CommandError(f"{flag}: {path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"{flag}: {path}: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        prompts = _jsonl_prompts(text, path, flag)
    else:
        prompts = _text_prompts(text, str(path))
    if not prompts:
        raise CommandError(f"{flag}: {path}: no prompts (empty file)")
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
            raise CommandError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(doc, dict):
            raise CommandError(f'{where}: expected an object with "prompt" or "messages"')
        unknown = sorted(set(doc) - {"prompt", "messages"})
        if unknown:
            raise CommandError(f'{where}: unknown key "{unknown[0]}"; accepted: prompt, messages')
        prompt, messages = doc.get("prompt"), doc.get("messages")
        if (prompt is None) == (messages is None):
            raise CommandError(f'{where}: give exactly one of "prompt" and "messages"')
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt.strip():
                raise CommandError(f'{where}: "prompt" must be a non-empty string')
            out.append(Prompt(text=prompt, source=f"{path}:{n}"))
            continue
        if not isinstance(messages, list) or not messages:
            raise CommandError(f'{where}: "messages" must be a non-empty list')
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
                raise CommandError(
                    f'{where}: "messages[{i}]" must be {{"role": non-empty string, '
                    f'"content": string}}'
                )
            pairs.append((msg["role"], msg["content"]))
        out.append(Prompt(messages=tuple(pairs), source=f"{path}:{n}"))
    return out


def make_request(prompt: Prompt, sampling: Sampling, max_tokens: int, policy: str) -> Request:
    from fse.core.types import Request

    return Request(
        prompt=prompt.text,
        messages=prompt.messages,
        max_tokens=max_tokens,
        sampling=sampling,
        policy=policy,
    )


# ---------------------------------------------------------------------------
# Running generations (in-process or through the daemon)


@dataclass(slots=True)
class Run:
    """One finished generation: its verdict and the metrics of every released token."""

    prompt: Prompt
    seed: int | None
    policy: str
    status: str
    tokens: int
    text: str
    steps: list[StepMetrics]
    seconds: float
    guard: str | None = None
    value: float | None = None
    threshold: float | None = None
    token_index: int | None = None
    replayed: bool = False  # verdict found by replaying metrics through a local guard chain
    message: str = ""
    pieces: list[str] = field(default_factory=list)  # released text, token by token

    @property
    def halted(self) -> bool:
        return self.status == "halted"


class Runner(Protocol):
    model_name: str
    n_vocab: int
    where: str

    def prepare(self, jobs: Sequence[tuple[Prompt, int]]) -> None: ...

    def serves(self, policy: Policy) -> bool: ...

    def unserved(self, policy: Policy) -> str: ...

    def run(self, prompt: Prompt, sampling: Sampling, max_tokens: int, policy: Policy) -> Run: ...

    def close(self) -> None: ...


def _collect(events: Iterator[Any], prompt: Prompt, seed: int | None, policy: str) -> Run:
    from fse.core.types import TokenEvent

    started = time.monotonic()
    steps: list[StepMetrics] = []
    pieces: list[str] = []
    for event in events:
        if isinstance(event, TokenEvent):
            steps.append(event.metrics)
            pieces.append(event.text)
            continue
        return Run(
            prompt=prompt,
            seed=seed,
            policy=policy,
            status=event.status,
            tokens=event.tokens,
            text=event.text,
            steps=steps,
            seconds=time.monotonic() - started,
            guard=event.guard,
            value=event.value,
            threshold=event.threshold,
            token_index=event.token_index,
            message=event.message,
            pieces=pieces,
        )
    raise RunError("the stream ended without a verdict")


class LocalRunner:
    """Generations in this process: one model, one context sized for the longest job."""

    def __init__(self, model_path: Path | None, threads: int, verbose: bool) -> None:
        if threads < 1:
            raise CommandError(f"--threads: {threads} is invalid; accepted: >= 1")
        self.model: Model = load_model(model_path, verbose)
        self.threads = threads
        self.ctx: Context | None = None
        self.model_name = self.model.name
        self.n_vocab = self.model.n_vocab
        self.where = f"in-process ({self.model.path.name})"

    def prepare(self, jobs: Sequence[tuple[Prompt, int]]) -> None:
        from fse.core.engine import Context
        from fse.core.types import Request
        from fse.serve.service import InvalidRequest, prompt_tokens

        needed = 0
        for prompt, max_tokens in jobs:
            request = Request(prompt=prompt.text, messages=prompt.messages)
            try:
                n = len(prompt_tokens(self.model, request)) + max_tokens
            except InvalidRequest as exc:
                raise CommandError(f"{prompt.source or 'prompt'}: {exc}") from None
            if n > self.model.n_ctx_train:
                raise CommandError(
                    f"{prompt.source or 'prompt'}: prompt plus {max_tokens} tokens exceed the "
                    f"model's context of {self.model.n_ctx_train} tokens (--max-tokens)"
                )
            needed = max(needed, n)
        n_ctx = min(self.model.n_ctx_train, max(512, -(-needed // 256) * 256))
        if self.ctx is None or self.ctx.n_ctx < n_ctx:
            if self.ctx is not None:
                self.ctx.close()
            self.ctx = Context(self.model, n_ctx=n_ctx, n_threads=self.threads)

    def serves(self, policy: Policy) -> bool:
        return True

    def unserved(self, policy: Policy) -> str:
        return ""

    def run(self, prompt: Prompt, sampling: Sampling, max_tokens: int, policy: Policy) -> Run:
        from fse.serve.service import run_local

        if self.ctx is None:
            self.prepare([(prompt, max_tokens)])
        assert self.ctx is not None
        request = make_request(prompt, sampling, max_tokens, policy.name)
        return _collect(
            run_local(self.model, self.ctx, request, policy), prompt, sampling.seed, policy.name
        )

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        self.model.close()


class RemoteRunner:
    """Generations through a running daemon (`fse serve`); policies are served by name."""

    def __init__(self, addr: str) -> None:
        import fse_client

        self.addr = addr
        try:
            with fse_client.Client(addr) as client:
                info = client.info(timeout=30)
        except fse_client.FseError as exc:
            raise RunError(
                f"cannot get info from the daemon at {addr} ({exc}); is `fse serve` running?"
            ) from None
        except ValueError as exc:  # a malformed address
            raise CommandError(f"--addr: {exc}") from None
        self.model_name: str = info.model.name
        self.n_vocab: int = info.model.vocab_size
        self.max_tokens: int = info.limits.max_tokens
        self.served: dict[str, str] = {p.name: p.sha256 for p in info.policies}
        self.where = f"daemon at {addr}"

    def prepare(self, jobs: Sequence[tuple[Prompt, int]]) -> None:
        longest = max((n for _, n in jobs), default=0)
        if longest > self.max_tokens:
            raise CommandError(
                f"--max-tokens: {longest} is above the daemon's limit of {self.max_tokens}"
            )

    def serves(self, policy: Policy) -> bool:
        return self.served.get(policy.name) == policy.sha256

    def unserved(self, policy: Policy) -> str:
        return _not_served(self.addr, policy, self.served)

    def run(self, prompt: Prompt, sampling: Sampling, max_tokens: int, policy: Policy) -> Run:
        from fse.tools.remote import ClientError, RemoteStream

        if not self.serves(policy):
            raise CommandError(_not_served(self.addr, policy, self.served))
        request = make_request(prompt, sampling, max_tokens, policy.name)
        try:
            return _collect(
                iter(RemoteStream(self.addr, request)), prompt, sampling.seed, policy.name
            )
        except ClientError as exc:
            if exc.code.name == "INVALID_ARGUMENT":
                raise CommandError(f"{prompt.source or 'prompt'}: {exc.message}") from None
            raise RunError(str(exc)) from None

    def close(self) -> None:
        pass


def _not_served(addr: str, policy: Policy, served: dict[str, str]) -> str:
    if policy.name in served:
        return (
            f"--policy: the daemon at {addr} serves a different policy named {policy.name!r} "
            f"(sha256 {served[policy.name][:12]}, this one {policy.sha256[:12]}); "
            "install the same file in its --policies-dir"
        )
    return (
        f"--policy: the daemon at {addr} does not serve policy {policy.name!r}; "
        f"it serves {', '.join(sorted(served))}. Put {policy.name}.toml in its --policies-dir"
    )


def open_runner(args: argparse.Namespace) -> Runner:
    """The in-process runner, or the daemon's when --addr is given."""
    if args.addr:
        if args.model is not None:
            raise CommandError("--model: not used with --addr (the daemon owns the model)")
        return RemoteRunner(args.addr)
    return LocalRunner(args.model, args.threads, args.verbose)


# ---------------------------------------------------------------------------
# Replay and statistics


def replay(steps: Sequence[StepMetrics], policy: Policy) -> Trip | None:
    """The first halting trip a fresh guard chain of `policy` finds in recorded steps.

    Windowed perplexity is recomputed from each step's nll for the policy's window.
    """
    from fse.core.guards import GuardChain
    from fse.core.metrics import PerplexityWindow

    chain = GuardChain(policy)
    window = PerplexityWindow(policy.ppl_window)
    for m in steps:
        ppl, cumulative = window.push(m.nll)
        for trip in chain.check(replace(m, ppl=ppl, ppl_cumulative=cumulative)):
            if trip.halts:
                return trip
    return None


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
    """Thresholds from healthy runs (see the module docstring for the rules)."""
    from fse.core.policy import (
        HealthBands,
        LoopGuard,
        MaxProbGuard,
        PerplexityGuard,
        Policy,
    )

    if not runs or not any(r.steps for r in runs):
        raise RunError("calibration produced no tokens; nothing to measure")
    low = 1.0 - q
    rows: list[MetricRow] = []
    warnings: list[str] = []
    fields: dict[str, Any] = {}

    def row(
        metric: str, values: Sequence[float], threshold: str, note: str = "", lo: bool = False
    ) -> None:
        p50, p99, p999 = (quantile(values, x) for x in ((0.5, 0.01, low) if lo else (0.5, 0.99, q)))
        rows.append(MetricRow(metric, len(values), p50, p99, p999, threshold, note))

    # perplexity (windowed, from the step at which the guard is armed)
    ppl_cfg = base.perplexity if base.perplexity is not None else PerplexityGuard()
    armed = max(0, ppl_cfg.min_tokens - 1)
    ppl = [
        v for r in runs for i, v in enumerate(windowed_ppl(r.steps, ppl_cfg.window)) if i >= armed
    ]
    ppl_threshold = math.nan
    if base.perplexity is not None and ppl:
        raw = quantile(ppl, q) * margin
        ppl_threshold = min(PPL_CEILING, max(PPL_FLOOR, _round_sig(raw, up=True)))
        fields["perplexity"] = replace(ppl_cfg, threshold=ppl_threshold)
        if raw > PPL_CEILING:
            warnings.append(
                f"perplexity: healthy p{_pct(q)} x margin = {raw:.4g} is above the hard limit "
                f"{PPL_CEILING:g}; the limit is used and healthy text will be halted (sample "
                "less loosely, or check that the corpus is healthy)"
            )
    row(
        f"perplexity (window {ppl_cfg.window or 'cumulative'})",
        ppl,
        _fmt(ppl_threshold) if base.perplexity is not None else "off",
        f"floor {PPL_FLOOR:g}, limit {PPL_CEILING:g}",
    )

    # L2 norm
    l2 = [m.l2_norm for r in runs for m in r.steps]
    l2_limit = _round_sig(L2_RMS_CEILING * math.sqrt(max(1, n_vocab)), up=False)
    l2_threshold = math.nan
    if base.l2_norm is not None:
        raw = quantile(l2, q) * margin
        l2_threshold = min(l2_limit, _round_sig(raw, up=True))
        fields["l2_norm"] = replace(base.l2_norm, threshold=l2_threshold)
        if raw > l2_limit:
            warnings.append(
                f"l2_norm: healthy p{_pct(q)} x margin = {raw:.4g} is above the physical limit "
                f"{l2_limit:g} (RMS logit {L2_RMS_CEILING:g} nats); the limit is used"
            )
    row(
        "l2_norm",
        l2,
        _fmt(l2_threshold) if base.l2_norm is not None else "off",
        f"limit {_fmt(l2_limit)}",
    )

    # logit variance (the low tail matters)
    var = [m.variance for r in runs for m in r.steps]
    var_threshold = math.nan
    if base.logit_variance is not None:
        raw = quantile(var, low) / margin
        var_threshold = max(VARIANCE_FLOOR, _round_sig(raw, up=False))
        fields["logit_variance"] = replace(base.logit_variance, threshold=var_threshold)
    row(
        "logit_variance (low tail)",
        var,
        _fmt(var_threshold) if base.logit_variance is not None else "off",
        f"p50 / p{_pct(0.01)} / p{_pct(low)}; limit >= {VARIANCE_FLOOR:g}",
        lo=True,
    )

    # loop: per generation, the longest tail cycle of >= min_repeats repeats. A generation
    # whose cycle reaches the hard limit is a loop by definition, not healthy data: it is
    # left out of the event-guard statistics (and shows up as an expected halt).
    loop_cfg = base.loop if base.loop is not None else LoopGuard()
    spans = [
        float(loop_span([m.token for m in r.steps], loop_cfg.max_period, loop_cfg.min_repeats))
        for r in runs
    ]
    healthy = [i for i, span in enumerate(spans) if span < LOOP_SPAN_CEILING]
    n_loops = len(runs) - len(healthy)
    span_q = quantile([spans[i] for i in healthy], q)
    min_span = loop_cfg.min_span
    if base.loop is not None:
        min_span = _event_threshold(span_q, base.loop.min_span, LOOP_SPAN_CEILING)
        fields["loop"] = replace(base.loop, min_span=min_span)
    if base.loop is not None and span_q + 1 > LOOP_SPAN_CEILING:
        warnings.append(
            f"loop: non-looping generations repeat a cycle over up to {span_q:g} tokens; "
            f"min_span is capped at {LOOP_SPAN_CEILING}"
        )
    if n_loops:
        warnings.append(
            f"loop: {n_loops} of {len(runs)} calibration generations end in a cycle covering "
            f"{LOOP_SPAN_CEILING} tokens or more (up to {max(spans):g}); they are loops, not "
            "healthy text: left out of the loop and max_prob statistics, counted as halts"
        )
    row(
        f"loop span (>= {loop_cfg.min_repeats} repeats, per generation)",
        spans,
        f"{loop_cfg.min_repeats} repeats / {min_span} tokens" if base.loop is not None else "off",
        f"non-looping p{_pct(q)} {_fmt(span_q)}; limit {LOOP_SPAN_CEILING} tokens",
    )

    # max probability: per step, and the longest run above the threshold per generation
    mp_cfg = base.max_prob if base.max_prob is not None else MaxProbGuard()
    mp = [m.max_prob for r in runs for m in r.steps]
    streaks = [
        float(longest_streak([m.max_prob for m in runs[i].steps], mp_cfg.threshold))
        for i in healthy
    ]
    streak_q = quantile(streaks, q)
    consecutive = mp_cfg.consecutive
    if base.max_prob is not None:
        consecutive = _event_threshold(
            streak_q, base.max_prob.consecutive, MAX_PROB_CONSECUTIVE_CEILING
        )
        fields["max_prob"] = replace(base.max_prob, consecutive=consecutive)
        if streak_q + 1 > MAX_PROB_CONSECUTIVE_CEILING:
            warnings.append(
                f"max_prob: non-looping generations stay above {mp_cfg.threshold:g} for up to "
                f"{streak_q:g} steps; consecutive is capped at {MAX_PROB_CONSECUTIVE_CEILING}"
            )
    row(
        "max_prob",
        mp,
        f"{mp_cfg.threshold:g} x {consecutive}" if base.max_prob is not None else "off",
        f"longest run above {mp_cfg.threshold:g}, non-looping p{_pct(q)}: {_fmt(streak_q)} steps",
    )

    health = base.health
    if "perplexity" in fields:
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


# ---------------------------------------------------------------------------
# Progress bar


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None) -> None:
        self.total = max(1, total)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._last_decile = -1

    def advance(self, note: str = "") -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done)
        frac = self.done / self.total
        if self.tty:
            width = 24
            filled = round(width * frac)
            bar = "#" * filled + "-" * (width - filled)
            note = note if len(note) <= 40 else note[:37] + "..."
            self.stream.write(
                f"\r\x1b[K{self.label} [{bar}] {self.done}/{self.total} "
                f"{_clock(elapsed)} elapsed, {_clock(left)} left  {note}"
            )
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile != self._last_decile or self.done >= self.total:
                self._last_decile = decile
                self.stream.write(
                    f"{self.label}: {self.done}/{self.total} ({frac:.0%}), "
                    f"{_clock(elapsed)} elapsed, {_clock(left)} left\n"
                )
        self.stream.flush()


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60}:{s % 60:02d}"


# ---------------------------------------------------------------------------
# Output files


def check_writable_file(path: Path, flag: str) -> None:
    """Fail before a long run, not after it, when `path` cannot be written."""
    if path.exists() and not path.is_file():
        raise CommandError(f"{flag}: {path}: exists and is not a regular file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CommandError(f"{flag}: {path}: directory {parent} does not exist")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise CommandError(f"{flag}: {path}: not writable")


def write_atomic(path: Path, text: str, flag: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CommandError(f"{flag}: {path}: cannot write: {exc.strerror or exc}") from None


def policy_name_for(path: Path) -> str:
    """A valid policy name from a file name (`calibrated.toml` -> `calibrated`)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem)[:64].strip(".-") or "calibrated"
    return stem if _NAME_RE.fullmatch(stem) else "calibrated"


# ---------------------------------------------------------------------------
# The command


def add_parser(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "calibrate",
        help="measure a model's healthy metrics and write a policy calibrated for it",
        description=(
            "Run healthy generations (a built-in prompt set or --corpus) at the given "
            "sampling settings, record every metric at every step, and write a policy "
            "whose thresholds sit at --quantile x --margin, clamped to hard limits."
        ),
    )
    p.add_argument("--addr", help="daemon address (unix:PATH or HOST:PORT); default: in-process")
    p.add_argument(
        "--corpus",
        type=Path,
        help="prompts: one per line, or JSONL ({'prompt': ...} or {'messages': [...]}) "
        "for a .jsonl file (default: the built-in set of 40)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="policy file to write (e.g. calibrated.toml)"
    )
    p.add_argument(
        "--name", help="policy name (default: the --out file name without .toml, e.g. calibrated)"
    )
    add_generation_flags(p)
    add_local_flags(p)
    p.set_defaults(policy="pro", max_tokens=DEFAULT_MAX_TOKENS)
    helps = {
        "policy": "base policy: its guards are the ones calibrated (pro)",
        "max_tokens": f"tokens per generation at most ({DEFAULT_MAX_TOKENS})",
        "seed": "first seed: generation i uses seed + i (0)",
    }
    for action in p._actions:  # the shared flags, with this command's defaults
        if action.dest in helps:
            action.help = helps[action.dest]
    p.add_argument(
        "--samples", type=int, default=1, help="generations per prompt, seeds seed.. (1)"
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=QUANTILE,
        help=f"healthy quantile the thresholds sit at ({QUANTILE})",
    )
    p.add_argument(
        "--margin", type=float, default=MARGIN, help=f"factor beyond that quantile ({MARGIN})"
    )
    p.add_argument(
        "--metrics-out", type=Path, help="also write the raw per-step metrics here (JSON)"
    )
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    try:
        return _calibrate(args)
    except (InputError, CommandError) as exc:
        print(f"fse calibrate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as exc:
        print(f"fse calibrate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _calibrate(args: argparse.Namespace) -> int:
    from fse.core.policy import Policy, PolicyError

    if args.max_tokens < 1:
        raise CommandError(f"--max-tokens: {args.max_tokens} is invalid; accepted: >= 1")
    if not 1 <= args.samples <= 1000:
        raise CommandError(f"--samples: {args.samples} is invalid; accepted: 1..1000")
    if not (math.isfinite(args.quantile) and 0.5 <= args.quantile < 1):
        raise CommandError(f"--quantile: {args.quantile} is invalid; accepted: 0.5 <= q < 1")
    if not (math.isfinite(args.margin) and 1 <= args.margin <= 100):
        raise CommandError(f"--margin: {args.margin} is invalid; accepted: 1 <= margin <= 100")
    sampling = sampling_from_args(args)
    base_seed = 0 if args.seed is None else args.seed
    if not 0 <= base_seed < 2**32:
        raise CommandError(f"--seed: {base_seed} is invalid; accepted: 0 <= seed < 2^32")
    try:
        base = resolve_policy(args.policy, args.policies_dir)
    except InputError as exc:
        raise CommandError(f"--policy: {str(exc).removeprefix('--policy: ')}") from None
    name = args.name if args.name is not None else policy_name_for(args.out)
    try:
        Policy(name=name)
    except PolicyError as exc:
        raise CommandError(f"--name: {exc}".replace("name: ", "", 1)) from None
    check_writable_file(args.out, "--out")
    if args.metrics_out is not None:
        check_writable_file(args.metrics_out, "--metrics-out")
    prompts = read_corpus(args.corpus) if args.corpus is not None else builtin_prompts()
    corpus_label = str(args.corpus) if args.corpus is not None else "built-in prompt set"

    observe = Policy(name=OBSERVE_POLICY)
    jobs = [(p, args.max_tokens) for p in prompts for _ in range(args.samples)]
    runner = open_runner(args)
    try:
        if isinstance(runner, RemoteRunner) and not runner.serves(observe):
            raise CommandError(
                f"--addr: the daemon at {args.addr} does not serve the observe-only policy "
                f"{OBSERVE_POLICY!r} (no guard but non_finite); put {OBSERVE_POLICY}.toml "
                f'holding the line name = "{OBSERVE_POLICY}" in its --policies-dir'
            )
        runner.prepare(jobs)
        progress = Progress(len(jobs), "calibrate")
        runs: list[Run] = []
        for i, (prompt, max_tokens) in enumerate(jobs):
            seed = (base_seed + i) % 2**32
            run = runner.run(prompt, replace(sampling, seed=seed), max_tokens, observe)
            if run.status == "error":
                raise RunError(f"{prompt.source}: generation failed: {run.message}")
            runs.append(run)
            progress.advance(prompt.label)
    finally:
        runner.close()

    s = sampling
    settings = (
        "greedy"
        if s.temperature == 0
        else f"temperature {s.temperature:g}, top_k {s.top_k}, top_p {s.top_p:g}, min_p {s.min_p:g}"
    )
    description = (
        f"calibrated by fse calibrate for {runner.model_name} on {len(runs)} generations "
        f"({corpus_label}; {settings}; up to {args.max_tokens} tokens); thresholds at "
        f"p{_pct(args.quantile)} x {args.margin:g}, clamped to hard limits; base policy "
        f"{base.name}"
    )
    cal = calibrate_policy(
        runs,
        base,
        name=name,
        n_vocab=runner.n_vocab,
        q=args.quantile,
        margin=args.margin,
        description=description,
    )
    header = "".join(
        f"# {line}\n" if line else "#\n"
        for line in report_lines(cal, runs, runner.model_name, settings)
    )
    write_atomic(args.out, header + "\n" + cal.policy.to_toml(), "--out")
    if args.metrics_out is not None:
        write_atomic(args.metrics_out, json.dumps(metrics_json(runs)) + "\n", "--metrics-out")
    print("\n".join(report_lines(cal, runs, runner.model_name, settings)))
    print(f"wrote {args.out}: policy {cal.policy.name} sha256 {cal.policy.sha256}")
    print(f"check it with: fse policy check {args.out}")
    return 0


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


def _num(x: float) -> float | None:
    return float(f"{x:.6g}") if math.isfinite(x) else None


def steps_json(steps: Sequence[StepMetrics]) -> dict[str, list[Any]]:
    """Per-step metrics, column by column (compact JSON); non-finite values are null."""
    return {
        "index": [m.index for m in steps],
        "token": [m.token for m in steps],
        "nll": [_num(m.nll) for m in steps],
        "ppl": [_num(m.ppl) for m in steps],
        "variance": [_num(m.variance) for m in steps],
        "max_prob": [_num(m.max_prob) for m in steps],
        "l2_norm": [_num(m.l2_norm) for m in steps],
    }


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
