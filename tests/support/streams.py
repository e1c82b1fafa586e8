"""Raw gRPC Generate calls against a daemon: `start` messages, what a call returned
(`Outcome`), the stream contract (`assert_well_formed`), and streams driven step by step
(`LiveStream`)."""

from __future__ import annotations

import json
import math
import queue
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from fse_client import Client, Sampling, Verdict
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.daemons import PROMPT
from support.waits import LIVE

Msg = fse_pb2.GenerateClientMessage
GREEDY = Sampling(temperature=0.0)  # for the Python client
Code = grpc.StatusCode

LONG = 200  # max_tokens for LONG_PROMPT streams (fits a 256-token context)
# Context tokens per stream of the `main` daemon (tests/serve/conftest.py).
CTX_PER_STREAM = 256
MAX_TOKENS_LIMIT = CTX_PER_STREAM - 1
VOCAB_SIZE = 262_144
N_LAYER = 18  # the embedded Gemma 3 270M's repeating layers
HEX64 = re.compile(r"[0-9a-f]{64}")


def start(
    prompt: str = PROMPT,
    max_tokens: int = 16,
    *,
    temperature: float | None = 0.0,
    seed: int | None = None,
    sampling: fse_pb2.Sampling | None = None,
    **fields: Any,
) -> Msg:
    """A `start` message; greedy unless told otherwise (`sampling` replaces both)."""
    if sampling is None:
        sampling = fse_pb2.Sampling()
        if temperature is not None:
            sampling.temperature = temperature
        if seed is not None:
            sampling.seed = seed
    request = fse_pb2.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, sampling=sampling, **fields
    )
    return Msg(start=request)


CANCEL = Msg(cancel=fse_pb2.Cancel())


@dataclass
class Outcome:
    """Everything one Generate call returned, and how the RPC ended."""

    messages: list[fse_pb2.GenerateServerMessage] = field(default_factory=list)
    code: grpc.StatusCode = Code.OK
    details: str = ""

    @property
    def tokens(self) -> list[fse_pb2.Token]:
        return [m.token for m in self.messages if m.WhichOneof("kind") == "token"]

    @property
    def verdicts(self) -> list[fse_pb2.Verdict]:
        return [m.verdict for m in self.messages if m.WhichOneof("kind") == "verdict"]

    @property
    def started(self) -> fse_pb2.Started:
        assert self.messages, f"no messages ({self.code.name}: {self.details})"
        assert self.messages[0].WhichOneof("kind") == "started"
        return self.messages[0].started

    @property
    def verdict(self) -> fse_pb2.Verdict:
        (verdict,) = self.verdicts
        return verdict

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


def generate(
    channel: grpc.Channel,
    messages: Sequence[Msg],
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float | None = LIVE,
) -> Outcome:
    """One Generate call: send `messages` (then half-close), read to the end."""
    outcome = Outcome()
    call = fse_pb2_grpc.GuardStub(channel).Generate(
        iter(list(messages)), metadata=tuple(metadata), timeout=timeout
    )
    try:
        for msg in call:
            outcome.messages.append(msg)
    except grpc.RpcError as exc:
        outcome.code, outcome.details = exc.code(), exc.details() or ""
    return outcome


def assert_well_formed(outcome: Outcome, max_tokens: int | None = None) -> fse_pb2.Verdict:
    """The stream contract: Started, Token 0..n-1, exactly one Verdict (last), status OK."""
    assert outcome.code == Code.OK, (outcome.code, outcome.details)
    kinds = [m.WhichOneof("kind") for m in outcome.messages]
    assert kinds[0] == "started"
    assert kinds[-1] == "verdict"
    assert kinds.count("verdict") == 1
    assert kinds.count("started") == 1
    started = outcome.started
    assert HEX64.fullmatch(started.policy_sha256)
    assert started.prompt_tokens > 0
    tokens = outcome.tokens
    assert [t.index for t in tokens] == list(range(len(tokens)))
    verdict = outcome.verdict
    assert verdict.tokens == len(tokens)
    assert verdict.text == outcome.text
    assert verdict.policy == started.policy
    assert verdict.policy_sha256 == started.policy_sha256
    if verdict.status == fse_pb2.STATUS_HALTED:
        assert verdict.guard
        assert verdict.HasField("token_index")
    else:
        assert verdict.guard == ""
        assert not verdict.HasField("token_index")
    # Why it ended: set for a completed stream, unspecified for every other status.
    if verdict.status == fse_pb2.STATUS_COMPLETED:
        assert verdict.completion != fse_pb2.COMPLETION_UNSPECIFIED
    else:
        assert verdict.completion == fse_pb2.COMPLETION_UNSPECIFIED
    if max_tokens is not None:
        assert verdict.tokens <= max_tokens
    return verdict


def assert_token_fields(token: fse_pb2.Token) -> None:
    assert 0 <= token.id < VOCAB_SIZE
    assert token.piece
    assert math.isfinite(token.nll) and token.nll >= 0
    assert math.isfinite(token.ppl) and token.ppl >= 1
    assert math.isfinite(token.ppl_cumulative) and token.ppl_cumulative >= 1
    assert token.variance > 0
    assert 0 < token.max_prob <= 1
    assert token.l2_norm > 0
    assert token.health in (fse_pb2.HEALTH_GREEN, fse_pb2.HEALTH_YELLOW, fse_pb2.HEALTH_RED)


class LiveStream:
    """A Generate call driven step by step: read some tokens, then cancel, hang up,
    or signal the daemon, and read the rest."""

    def __init__(
        self,
        channel: grpc.Channel,
        first: Msg,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = LIVE,
    ) -> None:
        self._outgoing: queue.Queue[Msg | None] = queue.Queue()
        self._outgoing.put(first)
        self.outcome = Outcome()
        self.call = fse_pb2_grpc.GuardStub(channel).Generate(
            self._requests(), metadata=tuple(metadata), timeout=timeout
        )

    def _requests(self) -> Iterator[Msg]:
        while (msg := self._outgoing.get()) is not None:
            yield msg

    def send(self, msg: Msg) -> None:
        self._outgoing.put(msg)

    def next(self) -> fse_pb2.GenerateServerMessage:
        msg: fse_pb2.GenerateServerMessage = next(self.call)
        self.outcome.messages.append(msg)
        return msg

    def read_tokens(self, n: int) -> None:
        """Read until `n` tokens (after Started) have arrived."""
        while len(self.outcome.tokens) < n:
            msg = self.next()
            assert msg.WhichOneof("kind") != "verdict", msg

    def finish(self) -> Outcome:
        """Read everything left; the RPC's status goes into the outcome."""
        try:
            for msg in self.call:
                self.outcome.messages.append(msg)
        except grpc.RpcError as exc:
            self.outcome.code, self.outcome.details = exc.code(), exc.details() or ""
        return self.outcome

    def __enter__(self) -> LiveStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._outgoing.put(None)
        self.call.cancel()


def health_status(channel: grpc.Channel, service: str = "") -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10
    )
    return int(reply.status)


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def client_verdict(addr: str, prompt: str = "Hi", max_tokens: int = 4, **kw: Any) -> Verdict:
    """One greedy generation through the Python client, read to the end: its verdict."""
    with Client(addr) as client:
        gen = client.generate(
            prompt, max_tokens=max_tokens, sampling=Sampling(temperature=0.0), **kw
        )
        for _ in gen:
            pass
    assert gen.verdict is not None
    return gen.verdict
