"""The domain's values: what a request asks, what a step measures, what a stream releases
and how it ends, and the names of statuses and guards.

A leaf: no native code, no numpy, no gRPC, nothing else of fse. The CLI's renderers,
the tools and the daemon's wire translation all speak these types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, TypeAlias

Action: TypeAlias = Literal["halt", "warn"]
Health: TypeAlias = Literal["green", "yellow", "red"]


def utf8_length(text: str) -> int:
    """Bytes of text in UTF-8; without a copy when it is ASCII (CPython knows that)."""
    return len(text) if text.isascii() else len(text.encode())


class Status(StrEnum):
    """How a stream ended (the strings of verdicts, JSON lines and the audit log)."""

    COMPLETED = "completed"
    HALTED = "halted"
    CANCELLED = "cancelled"
    ERROR = "error"


COMPLETED, HALTED, CANCELLED, ERROR = Status


class GuardName(StrEnum):
    """Every name a verdict's `guard` can hold."""

    PERPLEXITY = "perplexity"
    LOGIT_VARIANCE = "logit_variance"
    MAX_PROB = "max_prob"
    L2_NORM = "l2_norm"
    NON_FINITE = "non_finite"
    LOOP = "loop"
    NEAR_LOOP = "near_loop"
    ENTROPY = "entropy"
    PROMPT_PERPLEXITY = "prompt_perplexity"
    INTERNAL = "internal"  # a guard or the engine failed: fail closed
    DEADLINE = "deadline"  # the stream's time budget ran out (the runner, not the chain)
    SHUTDOWN = "shutdown"  # the daemon stopped before the stream ended (the scheduler)


PERPLEXITY = GuardName.PERPLEXITY
LOGIT_VARIANCE = GuardName.LOGIT_VARIANCE
MAX_PROB = GuardName.MAX_PROB
L2_NORM = GuardName.L2_NORM
NON_FINITE = GuardName.NON_FINITE
LOOP = GuardName.LOOP
NEAR_LOOP = GuardName.NEAR_LOOP
ENTROPY = GuardName.ENTROPY
PROMPT_PERPLEXITY = GuardName.PROMPT_PERPLEXITY
INTERNAL = GuardName.INTERNAL
DEADLINE = GuardName.DEADLINE
SHUTDOWN = GuardName.SHUTDOWN


@dataclass(frozen=True, slots=True)
class Sampling:
    """llama.cpp CLI defaults; temperature 0 is greedy. None seed = a random one."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the field and its accepted range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: {self.temperature} is invalid; accepted: finite >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k: {self.top_k} is invalid; accepted: >= 0 (0 = off)")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p: {self.top_p} is invalid; accepted: 0 < top_p <= 1")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p: {self.min_p} is invalid; accepted: 0 <= min_p <= 1")
        if self.seed is not None and not (0 <= self.seed < 2**32):
            raise ValueError(f"seed: {self.seed} is invalid; accepted: 0 <= seed < 2^32")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class StepMetrics:
    """One generated token and the statistics of the logits it was sampled from."""

    index: int  # 0-based position among the generated tokens
    token: int  # token id
    nll: float  # -log p(token) under the raw (untempered, untruncated) distribution
    ppl: float  # perplexity over the last `window` tokens, this one included
    ppl_cumulative: float  # perplexity over every generated token so far
    variance: float  # population variance of the finite logits
    max_prob: float  # probability of the most likely token under the raw distribution
    l2_norm: float  # L2 norm of the finite logits
    non_finite: int  # count of NaN/Inf logits
    entropy: float = math.nan  # of the raw next-token distribution, in nats


@dataclass(frozen=True, slots=True)
class Trip:
    """A guard that tripped on one token. value/threshold are None for ``internal``."""

    guard: str
    value: float | None
    threshold: float | None
    token_index: int
    action: Action
    # What the value alone does not say, for people (near_loop: the period); a halt's
    # verdict carries it as its message. Not compared: two trips differ by their numbers.
    detail: str = field(default="", compare=False)

    @property
    def halts(self) -> bool:
        return self.action == "halt"


@dataclass(frozen=True, slots=True)
class Request:
    """One generation: a raw prompt or chat messages, and how to sample it."""

    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content), rendered by the model's template
    max_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    policy: str = "default"
    stop: tuple[str, ...] = ()
    request_id: str = ""
    timeout: float | None = None  # seconds from admission; None = no deadline

    def text_length(self) -> int:
        """Characters of prompt and messages: what tokenizing will cost, in O(1) per part."""
        return len(self.prompt) + sum(len(role) + len(content) for role, content in self.messages)


@dataclass(slots=True)
class TokenEvent:
    """A token that passed every halting guard and is released to the client."""

    index: int
    token: int
    piece: bytes  # raw bytes of the token (may end inside a UTF-8 character)
    text: str  # complete characters only; the rest is carried to the next token
    metrics: StepMetrics
    health: str  # green | yellow | red, from the windowed perplexity
    warnings: tuple[Trip, ...] = ()  # guards with action "warn" that tripped on this token


@dataclass(slots=True)
class Verdict:
    """How a stream ended. guard/value/threshold/token_index are set only for halts."""

    status: Status
    tokens: int  # tokens released
    text: str  # the released text
    policy: str
    policy_sha256: str
    guard: str | None = None
    value: float | None = None
    threshold: float | None = None
    token_index: int | None = None
    message: str = ""  # human detail for errors
    # Why a `completed` stream ended (COMPLETIONS); None for every other status.
    completion: str | None = None


# A completed stream ended at the model's end of generation, at a stop sequence, or at
# max_tokens (OpenAI's finish_reason "stop" for the first two, "length" for the last).
END_OF_GENERATION, STOP_SEQUENCE, MAX_TOKENS = COMPLETIONS = (
    "end_of_generation",
    "stop_sequence",
    "max_tokens",
)

Event = TokenEvent | Verdict
