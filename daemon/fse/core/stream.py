"""One guarded stream: what it asks for, what it releases, how it ends.

A GuardedStream judges each sampled token with the stream's guard chain before
the token may leave the process, holds back text that could still turn into a
stop sequence, and ends with exactly one Verdict. The in-process runner and the
daemon's scheduler both drive streams through this class, so both paths release
the same tokens and end with the same verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fse.core.engine import Step
from fse.core.faults import NO_FAULTS, Faults
from fse.core.guards import GuardChain
from fse.core.policy import Policy
from fse.core.types import (
    CANCELLED,
    COMPLETED,
    DEADLINE,
    END_OF_GENERATION,
    ERROR,
    HALTED,
    INTERNAL,
    MAX_TOKENS,
    STOP_SEQUENCE,
    Status,
    TokenEvent,
    Trip,
    Verdict,
)


@dataclass(frozen=True, slots=True)
class Deadline:
    """A stream's time budget, in one form once the stream is admitted.

    Before admission the budget is relative: Request.timeout, seconds (the wire's
    timeout_ms, or what the RPC's own deadline leaves). Admission turns it into `at`, an
    absolute time.monotonic(), here and nowhere else (`Deadline.start`: the scheduler's
    submit, run_local's start); from then on every check, waiting or decoding, compares
    the clock with `at`. `started` and `seconds` are kept only for the `deadline`
    verdict: its value is the seconds elapsed, its threshold the budget.
    """

    at: float
    started: float
    seconds: float

    @classmethod
    def start(cls, seconds: float | None, now: float) -> Deadline | None:
        """The deadline of a stream admitted at `now` (time.monotonic()) with a budget of
        `seconds` (Request.timeout; None: no deadline)."""
        return None if seconds is None else cls(now + seconds, now, seconds)

    def passed(self, now: float) -> bool:
        return now > self.at


class GuardedStream:
    """Per-stream judgement: guard chain, stop sequences, budgets, released text, verdict.

    Both runners (fse.core.runner for one stream in this process, the daemon's scheduler
    for many) drive a stream the same way, so they cannot drift apart:
    `before_step` ends it when the client cancelled or the deadline passed, `step`
    judges a sampled token and ends it at max_tokens, `fail` ends it on an engine error.
    """

    def __init__(
        self,
        policy: Policy,
        stop: Sequence[str] = (),
        faults: Faults = NO_FAULTS,
        *,
        max_tokens: int | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self.policy = policy
        self.max_tokens = max_tokens
        self.deadline = deadline
        self.chain = GuardChain(policy, fault_at=faults.guard_error_at)
        self.stop = tuple(s for s in stop if s)
        self._released: list[str] = []
        self._held: list[TokenEvent] = []  # passed, but might be the start of a stop sequence
        self.verdict: Verdict | None = None

    @property
    def tokens(self) -> int:
        return len(self._released)

    def before_step(self, cancelled: bool, now: float, produced: int) -> list[TokenEvent]:
        """Before the next token is judged (`now`: time.monotonic()): a cancel ends the
        stream `cancelled`, a passed deadline halts it with guard `deadline` at the token
        it would have produced."""
        if cancelled:
            return self.finish(CANCELLED)
        deadline = self.deadline
        if deadline is not None and deadline.passed(now):
            return self.finish(HALTED, DEADLINE, now - deadline.started, deadline.seconds, produced)
        return []

    def step(self, step: Step) -> list[TokenEvent]:
        """Judge a sampled token; the max_tokens-th token ends the stream `completed`."""
        released = self.judge(step)
        limit = self.max_tokens
        if self.verdict is None and limit is not None and step.metrics.index + 1 >= limit:
            released += self.finish(COMPLETED, completion=MAX_TOKENS)
        return released

    @property
    def scores_prompt(self) -> bool:
        """Whether the policy judges the prompt (its nll is measured during prefill)."""
        return self.chain.scores_prompt

    def judge_prompt(self, nll: Sequence[float], content: Sequence[bool] | None = None) -> bool:
        """Judge the prompt once it is decoded, before the first token: a halting prompt
        guard ends the stream `halted` at token index 0 with nothing released. True if
        the stream goes on. `nll[i]` is the prompt's token i + 1; with `content` (see
        fse.core.runner.content_mask) only the tokens it marks are judged."""
        if content is not None:
            nll = [x for i, x in enumerate(nll) if content[i + 1]]
        trips = self.chain.check_prompt(nll)
        if trips and trips[0].action == "halt":
            halt = trips[0]
            self._end(HALTED, halt.guard, halt.value, halt.threshold, 0)
            return False
        return True

    def fail(self, message: str) -> list[TokenEvent]:
        """The engine failed: fail closed with an `error` verdict naming guard `internal`."""
        return self.finish(ERROR, INTERNAL, message=message)

    def judge(self, step: Step) -> list[TokenEvent]:
        """Judge one sampled token; returns the events it releases. Sets self.verdict
        when the stream is over (a halt, end of generation, or a stop sequence)."""
        m = step.metrics
        try:
            trips = self.chain.check(m)
        except Exception:  # the chain promises not to raise; fail closed if it does
            trips = (Trip(INTERNAL, None, None, m.index, "halt"),)
        if trips and trips[0].action == "halt":
            released = self._release_held()
            halt = trips[0]
            self._end(HALTED, halt.guard, halt.value, halt.threshold, halt.token_index, halt.detail)
            return released
        if step.end_of_generation:
            released = self._release_held()
            self._end(COMPLETED, completion=END_OF_GENERATION)
            return released
        event = TokenEvent(
            m.index, m.token, step.piece, step.text, m, self.policy.health.classify(m.ppl), trips
        )
        if not self.stop:
            self._released.append(event.text)
            return [event]
        return self._hold_for_stop(event)

    def finish(
        self,
        status: Status = COMPLETED,
        guard: str | None = None,
        value: float | None = None,
        threshold: float | None = None,
        token_index: int | None = None,
        message: str = "",
        *,
        completion: str | None = None,
    ) -> list[TokenEvent]:
        """End the stream from outside (max_tokens, cancel, deadline, shutdown, error).
        Held-back tokens passed their guards, so a clean ending releases them."""
        released = self._release_held() if status in (COMPLETED, HALTED) else []
        self._end(status, guard, value, threshold, token_index, message, completion)
        return released

    def _end(
        self,
        status: Status,
        guard: str | None = None,
        value: float | None = None,
        threshold: float | None = None,
        token_index: int | None = None,
        message: str = "",
        completion: str | None = None,
    ) -> None:
        if value is not None and not math.isfinite(value):
            value = None  # JSON has no NaN; a non-finite value says nothing more than the guard
        self.verdict = Verdict(
            status,
            self.tokens,
            "".join(self._released),
            self.policy.name,
            self.policy.sha256,
            guard,
            value,
            threshold,
            token_index,
            message,
            completion if status == COMPLETED else None,
        )

    def _release_held(self) -> list[TokenEvent]:
        held, self._held = self._held, []
        self._released.extend(e.text for e in held)
        return held

    def _hold_for_stop(self, event: TokenEvent) -> list[TokenEvent]:
        self._held.append(event)
        pending = "".join(e.text for e in self._held)
        cut = min((i for s in self.stop if (i := pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            released = self._release_until(cut)
            self._end(COMPLETED, completion=STOP_SEQUENCE)
            return released
        # Keep back the longest tail of pending that is still a prefix of some stop string.
        keep = max(
            (
                n
                for s in self.stop
                for n in range(min(len(s) - 1, len(pending)), 0, -1)
                if s.startswith(pending[-n:])
            ),
            default=0,
        )
        return self._release_until(len(pending) - keep, partial=False)

    def _release_until(self, cut: int, partial: bool = True) -> list[TokenEvent]:
        """Release held tokens whose text ends at or before `cut` characters; with
        partial, the token that straddles `cut` is released trimmed to it."""
        released: list[TokenEvent] = []
        offset = 0
        while self._held:
            event = self._held[0]
            end = offset + len(event.text)
            if end > cut:
                if partial and offset < cut:
                    text = event.text[: cut - offset]
                    event.text, event.piece = text, text.encode("utf-8")
                    released.append(event)
                    self._released.append(text)
                    self._held.pop(0)
                break
            released.append(event)
            self._released.append(event.text)
            self._held.pop(0)
            offset = end
        if partial:
            self._held.clear()
        return released
