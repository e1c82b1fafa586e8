"""What `fse calibrate` and `fse experiment` share: prompts, finished runs, the runners
that produce them (in this process or through a daemon), replay through a local guard
chain, the progress bar and atomic file writes.

Bad input (a prompt the model cannot take, a policy the daemon does not serve) raises
fse.core.errors.InputError; a generation that cannot run raises :class:`RunError`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from fse.core.errors import InputError

if TYPE_CHECKING:
    from fse.core.engine import Context
    from fse.core.model import Model
    from fse.core.policy import Policy
    from fse.core.types import Request, Sampling, StepMetrics, Trip

OBSERVE_POLICY = "calibration"  # the observe-only policy a daemon must serve for --addr


class RunError(Exception):
    """A generation could not run (the daemon is unreachable, llama.cpp failed)."""


# ---------------------------------------------------------------------------
# Prompts


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


def make_request(prompt: Prompt, sampling: Sampling, max_tokens: int, policy: str) -> Request:
    from fse.core.types import Request

    return Request(
        prompt=prompt.text,
        messages=prompt.messages,
        max_tokens=max_tokens,
        sampling=sampling,
        policy=policy,
    )


def observe_policy() -> Policy:
    """No configurable guard (non_finite stays on): every step's metrics come back."""
    from fse.core.policy import Policy

    return Policy(name=OBSERVE_POLICY)


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
    # -log p of each prompt token after the first, as the prompt guards see it (only the
    # messages' own text for chat); None where it was not measured (through a daemon).
    prompt_nll: list[float] | None = None

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

    def prompt_nll(self, prompt: Prompt) -> list[float] | None: ...

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
    """Generations in this process (fse.core.runner, the same judgement as the daemon's):
    one model, one context sized for the longest job. Takes ownership of `model` (closed
    by close())."""

    def __init__(self, model: Model, threads: int) -> None:
        self.model = model
        self.threads = threads
        self.ctx: Context | None = None
        self.model_name = self.model.name
        self.n_vocab = self.model.n_vocab
        self.where = f"in-process ({self.model.path.name})"

    def prepare(self, jobs: Sequence[tuple[Prompt, int]]) -> None:
        from fse.core.engine import Context
        from fse.core.runner import prompt_tokens
        from fse.core.types import Request

        needed = 0
        for prompt, max_tokens in jobs:
            request = Request(prompt=prompt.text, messages=prompt.messages)
            try:
                n = len(prompt_tokens(self.model, request)) + max_tokens
            except InputError as exc:
                raise InputError(f"{prompt.source or 'prompt'}: {exc}") from None
            if n > self.model.n_ctx_train:
                raise InputError(
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
        from fse.core.runner import run_local

        if self.ctx is None:
            self.prepare([(prompt, max_tokens)])
        assert self.ctx is not None
        request = make_request(prompt, sampling, max_tokens, policy.name)
        events = run_local(self.model, self.ctx, request, policy)
        return _collect(events, prompt, sampling.seed, policy.name)

    def prompt_nll(self, prompt: Prompt) -> list[float]:
        """The prompt's nll as the prompt guards judge it: one prefill, scored, nothing
        generated; for chat, only the messages' own tokens (fse.core.runner.content_mask)."""
        from fse.core.engine import generate
        from fse.core.runner import content_mask, prompt_tokens
        from fse.core.types import Request, Sampling

        if self.ctx is None:
            self.prepare([(prompt, 0)])
        assert self.ctx is not None
        request = Request(prompt=prompt.text, messages=prompt.messages)
        tokens = prompt_tokens(self.model, request)
        seen: list[float] = []

        def judge(nll: Sequence[float]) -> bool:
            seen.extend(nll)
            return False  # stop before the first token

        for _ in generate(self.ctx, tokens, Sampling(temperature=0.0), 1, prompt_judge=judge):
            pass
        mask = content_mask(self.model, request, tokens)
        return seen if mask is None else [x for i, x in enumerate(seen) if mask[i + 1]]

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
            raise InputError(f"--addr: {exc}") from None
        self.model_name: str = info.model.name
        self.n_vocab: int = info.model.vocab_size
        self.max_tokens: int = info.limits.max_tokens
        self.served: dict[str, str] = {p.name: p.sha256 for p in info.policies}
        self.where = f"daemon at {addr}"

    def prepare(self, jobs: Sequence[tuple[Prompt, int]]) -> None:
        longest = max((n for _, n in jobs), default=0)
        if longest > self.max_tokens:
            raise InputError(
                f"--max-tokens: {longest} is above the daemon's limit of {self.max_tokens}"
            )

    def serves(self, policy: Policy) -> bool:
        return self.served.get(policy.name) == policy.sha256

    def unserved(self, policy: Policy) -> str:
        return _not_served(self.addr, policy, self.served)

    def run(self, prompt: Prompt, sampling: Sampling, max_tokens: int, policy: Policy) -> Run:
        from fse.tools.remote import ClientError, RemoteStream

        if not self.serves(policy):
            raise InputError(_not_served(self.addr, policy, self.served))
        request = make_request(prompt, sampling, max_tokens, policy.name)
        try:
            return _collect(
                iter(RemoteStream(self.addr, request)), prompt, sampling.seed, policy.name
            )
        except ClientError as exc:
            if exc.code.name == "INVALID_ARGUMENT":
                raise InputError(f"{prompt.source or 'prompt'}: {exc.message}") from None
            raise RunError(str(exc)) from None

    def prompt_nll(self, prompt: Prompt) -> None:
        """Not measured: a daemon does not report the prompt's nll."""
        return None

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


# ---------------------------------------------------------------------------
# Replay


def replay(
    steps: Sequence[StepMetrics], policy: Policy, prompt_nll: Sequence[float] | None = None
) -> Trip | None:
    """The first halting trip a fresh guard chain of `policy` finds in recorded steps,
    after its prompt guards judge `prompt_nll` (Run.prompt_nll) when it was measured.

    Windowed perplexity is recomputed from each step's nll for the policy's window.
    """
    from fse.core.guards import GuardChain
    from fse.core.metrics import PerplexityWindow

    chain = GuardChain(policy)
    if prompt_nll is not None and chain.scores_prompt:
        refused = [t for t in chain.check_prompt(prompt_nll) if t.halts]
        if refused:
            return refused[0]
    window = PerplexityWindow(policy.ppl_window)
    for m in steps:
        ppl, cumulative = window.push(m.nll)
        for trip in chain.check(replace(m, ppl=ppl, ppl_cumulative=cumulative)):
            if trip.halts:
                return trip
    return None


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
        "entropy": [_num(m.entropy) for m in steps],
    }


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


def write_atomic(path: Path, text: str, flag: str) -> None:
    """Write `path` whole or not at all; a failure is an InputError naming `flag`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{flag}: {path}: cannot write: {exc.strerror or exc}") from None
