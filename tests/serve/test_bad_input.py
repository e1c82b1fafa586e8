"""Bad Generate input through a real daemon: each refused with the status code and a
message naming the field and what it accepts, never disturbing other streams.

Most tests share the `main` and `single` daemons of tests/serve/conftest.py
(package-scoped); tests that kill or stop a daemon, or watch one start, get their own.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from fse_client.v1 import fse_pb2
from grpc_health.v1 import health_pb2
from support.daemons import (
    LONG_PROMPT,
    Daemon,
)
from support.streams import (
    CANCEL,
    LONG,
    Code,
    LiveStream,
    Msg,
    assert_well_formed,
    generate,
    health_status,
    start,
)

# -- 6. bad input -----------------------------------------------------------------

LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens


def _sampling(**kw: Any) -> fse_pb2.Sampling:
    return fse_pb2.Sampling(**kw)


INVALID = Code.INVALID_ARGUMENT
CHAT = [fse_pb2.ChatMessage(role="user", content="hi")]


@dataclass(frozen=True)
class Bad:
    messages: list[Msg]
    code: grpc.StatusCode = INVALID
    field: str = ""  # the message starts with it
    accepted: tuple[str, ...] = ()  # and says what is accepted


BAD_INPUTS: dict[str, Bad] = {
    "empty prompt": Bad([start("")], field="prompt:"),
    "prompt beyond context": Bad(
        [start(LONG_TEXT, 8)], field="prompt:", accepted=("256 tokens", "accepted: at most 255")
    ),
    "max_tokens after prompt": Bad(
        [start(LONG_TEXT[:600], 200)], field="max_tokens:", accepted=("accepted: 1..",)
    ),
    "max_tokens 0": Bad([start(max_tokens=0)], field="max_tokens:", accepted=("accepted: 1..255",)),
    "max_tokens above limit": Bad(
        [start(max_tokens=256)], field="max_tokens:", accepted=("accepted: 1..255",)
    ),
    "temperature negative": Bad(
        [start(sampling=_sampling(temperature=-0.5))],
        field="sampling.temperature:",
        accepted=("accepted: finite >= 0",),
    ),
    "temperature nan": Bad(
        [start(sampling=_sampling(temperature=math.nan))],
        field="sampling.temperature:",
        accepted=("accepted: finite >= 0",),
    ),
    "temperature inf": Bad(
        [start(sampling=_sampling(temperature=math.inf))],
        field="sampling.temperature:",
        accepted=("accepted: finite >= 0",),
    ),
    "top_p 0": Bad(
        [start(sampling=_sampling(top_p=0.0))],
        field="sampling.top_p:",
        accepted=("accepted: 0 < top_p <= 1",),
    ),
    "top_p 1.5": Bad(
        [start(sampling=_sampling(top_p=1.5))],
        field="sampling.top_p:",
        accepted=("accepted: 0 < top_p <= 1",),
    ),
    "unknown policy": Bad(
        [start(policy="nonesuch")],
        field="policy:",
        accepted=("nonesuch", "accepted: default, pro, warny"),
    ),
    "first message cancel": Bad([CANCEL], field="start:"),
    "half-close without a message": Bad([], field="start:"),
    "second start": Bad([start(LONG_PROMPT, LONG), start()], field="start:"),
    "too many stops": Bad(
        [start(stop=[f"s{i}" for i in range(17)])], field="stop:", accepted=("at most 16",)
    ),
    "request_id too long": Bad(
        [start(request_id="r" * 129)], field="request_id:", accepted=("at most 128 bytes",)
    ),
    "5 MiB message": Bad([start("a" * (5 << 20))], Code.RESOURCE_EXHAUSTED),
    "1.5 MiB prompt": Bad(
        [start("a " * (768 << 10))], field="prompt:", accepted=(f"at most {1 << 20} bytes",)
    ),
    "messages without chat template": Bad(
        [Msg(start=fse_pb2.GenerateRequest(messages=CHAT, max_tokens=8))], field="messages:"
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(main_channel: grpc.Channel, case: str) -> None:
    bad = BAD_INPUTS[case]
    outcome = generate(main_channel, bad.messages)
    assert outcome.code == bad.code, (outcome.code, outcome.details)
    assert outcome.details.startswith(bad.field), outcome.details
    for words in bad.accepted:
        assert words in outcome.details, (words, outcome.details)
    assert outcome.verdicts == []  # refused, never "completed"
    if case != "second start":
        assert outcome.messages == []


def test_bad_input_does_not_disturb_other_streams(main: Daemon, main_channel: grpc.Channel) -> None:
    with LiveStream(main_channel, start(LONG_PROMPT, 48, request_id="bystander")) as live:
        live.read_tokens(1)
        with ThreadPoolExecutor(4) as pool:
            bad = list(pool.map(lambda b: generate(main_channel, b.messages), BAD_INPUTS.values()))
        outcome = live.finish()
    assert [b.code for b in bad] == [b.code for b in BAD_INPUTS.values()]
    verdict = assert_well_formed(outcome, 48)
    assert (verdict.status, verdict.tokens) == (fse_pb2.STATUS_COMPLETED, 48)
    after = generate(main_channel, [start(max_tokens=8)])
    assert assert_well_formed(after, 8).status == fse_pb2.STATUS_COMPLETED
    assert health_status(main_channel) == health_pb2.HealthCheckResponse.SERVING
