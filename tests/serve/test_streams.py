"""Guarded streams end to end through a real `fse serve` process, the real embedded
model and real gRPC clients (no mocks): both transports, UTF-8 split across tokens,
seeds, the start banner, sixteen concurrent streams, stop sequences.

Most tests share the `main` and `single` daemons of tests/serve/conftest.py
(package-scoped); tests that kill or stop a daemon, or watch one start, get their own.
"""

from __future__ import annotations

import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor

import fse_client
import grpc
import pytest
from fse.core.policy import load_policies
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from grpc_health.v1 import health_pb2
from support.daemons import (
    PROMPT,
    Daemon,
    audit_events,
)
from support.streams import (
    CANCEL,
    GREEDY,
    Outcome,
    assert_token_fields,
    assert_well_formed,
    generate,
    health_status,
    start,
)
from support.waits import LIVE

# -- 1. guarded generation end to end ---------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_guarded_stream_end_to_end(main: Daemon, greedy_reference: Outcome, transport: str) -> None:
    addr = main.addrs[0] if transport == "unix" else main.addrs[1]
    assert addr.startswith("unix:") == (transport == "unix")
    with grpc.insecure_channel(addr) as channel:
        info = fse_pb2_grpc.GuardStub(channel).GetInfo(fse_pb2.GetInfoRequest(), timeout=10)
        outcome = generate(channel, [start(PROMPT, 12, request_id=f"e2e-{transport}")])
    verdict = assert_well_formed(outcome, 12)
    started = outcome.started
    assert started.request_id == f"e2e-{transport}"
    assert started.policy == "default"
    assert started.policy_sha256 == load_policies(None)["default"].sha256
    assert started.seed == 0  # greedy
    assert started.model == info.model.name
    assert len(outcome.tokens) == 12
    for token in outcome.tokens:
        assert_token_fields(token)
    # ASCII output: every piece is complete text, and the pieces are the output.
    assert b"".join(t.piece for t in outcome.tokens).decode() == verdict.text
    assert verdict.status == fse_pb2.STATUS_COMPLETED
    assert verdict.tokens == 12
    assert not verdict.HasField("value") and not verdict.HasField("threshold")
    # Both transports serve the same greedy tokens.
    assert outcome.ids == greedy_reference.ids[:12]


def test_utf8_character_split_across_tokens(main_channel: grpc.Channel) -> None:
    """Byte-fallback tokens end inside a character: `text` carries only complete ones."""
    outcome = generate(main_channel, [start("Some rare CJK characters: \U00020000\U00020001", 24)])
    verdict = assert_well_formed(outcome, 24)
    assert any(t.piece and not t.text for t in outcome.tokens)  # this case really happened
    raw = b"".join(t.piece for t in outcome.tokens)
    assert "\ufffd" not in verdict.text
    assert any(ord(c) > 0xFFFF for c in verdict.text)
    assert raw.startswith(verdict.text.encode())
    assert len(raw) - len(verdict.text.encode()) < 4  # at most one unfinished character


def test_seed_is_echoed_and_reported(main_channel: grpc.Channel) -> None:
    given = generate(main_channel, [start(max_tokens=8, temperature=0.8, seed=4242)])
    assert_well_formed(given, 8)
    assert given.started.seed == 4242
    greedy = generate(main_channel, [start(max_tokens=2, temperature=0.0, seed=4242)])
    assert greedy.started.seed == 0  # greedy samples nothing: no seed is in use
    again = generate(main_channel, [start(max_tokens=8, temperature=0.8, seed=4242)])
    assert again.ids == given.ids  # same seed, same tokens
    # Unset seed: a random one is drawn, reported in Started, and replays the stream.
    drawn = generate(main_channel, [start(max_tokens=8, temperature=0.8)])
    assert_well_formed(drawn, 8)
    replay = generate(main_channel, [start(max_tokens=8, temperature=0.8, seed=drawn.started.seed)])
    assert replay.ids == drawn.ids


def test_start_banner_gives_a_command_that_works(single: Daemon) -> None:
    """What `make run` prints: where it serves, where it audits, and a ready-to-paste
    `fse generate --addr` command, which works as printed (with the CLI's default
    max_tokens, which `single`'s default context allows)."""
    lines = [line for line in single.log().splitlines() if not line.startswith("{")]
    serving = next(line for line in lines if line.startswith("fse: serving "))
    assert f" on {', '.join(single.addrs)}; audit log {single.audit_path}" in serving
    command = next(line for line in lines if line.startswith("try: ")).removeprefix("try: ")
    argv = shlex.split(command)
    assert argv[-3:] == ["--addr", single.addr, PROMPT]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=LIVE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "[completed at " in result.stderr  # end_of_generation or max_tokens


# -- 3. concurrency ---------------------------------------------------------------


def test_sixteen_concurrent_streams(main: Daemon, main_channel: grpc.Channel) -> None:
    temperatures = [0.0, 0.7, 1.0, 1.3]
    prompts = [PROMPT, "Once upon a time", "The best way to learn Python is", "Dear diary,"]
    requests = [
        start(
            prompts[i % 4],
            16 + (i % 3) * 8,
            temperature=temperatures[i % 4],
            seed=1000 + i,
            policy="pro" if i % 2 else "default",
            request_id=f"c{i}",
        )
        for i in range(16)
    ]
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda r: generate(main_channel, [r]), requests))
    for i, (request, outcome) in enumerate(zip(requests, outcomes, strict=True)):
        max_tokens = request.start.max_tokens
        verdict = assert_well_formed(outcome, max_tokens)
        assert outcome.started.request_id == f"c{i}"
        assert outcome.started.policy == ("pro" if i % 2 else "default")
        if request.start.sampling.temperature > 0:
            assert outcome.started.seed == 1000 + i
        if verdict.status == fse_pb2.STATUS_COMPLETED:
            # None of these prompts reaches end-of-generation this early.
            assert verdict.tokens == max_tokens, (i, verdict)
        else:
            assert verdict.status == fse_pb2.STATUS_HALTED, (i, verdict)
            assert verdict.token_index == verdict.tokens
            assert verdict.guard in ("perplexity", "loop", "max_prob", "logit_variance")
    ends = [e for e in audit_events(main, "stream.verdict") if e["request_id"].startswith("c")]
    assert sorted(e["request_id"] for e in ends) == sorted(f"c{i}" for i in range(16))
    assert health_status(main_channel) == health_pb2.HealthCheckResponse.SERVING


# -- 7. stop sequences ------------------------------------------------------------


@pytest.mark.parametrize("stop", ["country of", "capi", " France."])
def test_stop_sequence(main_channel: grpc.Channel, greedy_reference: Outcome, stop: str) -> None:
    full = greedy_reference.text
    assert stop in full, full  # the greedy output contains it
    outcome = generate(main_channel, [start(PROMPT, 48, stop=["never-generated", stop])])
    verdict = assert_well_formed(outcome, 48)
    assert verdict.status == fse_pb2.STATUS_COMPLETED
    assert verdict.text == full[: full.index(stop)]
    assert outcome.text == verdict.text
    for token in outcome.tokens:
        assert stop not in token.text
    assert stop not in verdict.text
    assert verdict.tokens < 48


def test_stop_sequence_not_generated(main_channel: grpc.Channel, greedy_reference: Outcome) -> None:
    """Text held back because it could begin a stop string is released when it cannot:
    the last token (a prefix of `stop`) is held until the stream ends at max_tokens."""
    stop = greedy_reference.tokens[-1].text + "\u2603"
    assert stop not in greedy_reference.text
    outcome = generate(main_channel, [start(PROMPT, 48, stop=[stop, " France!"])])
    verdict = assert_well_formed(outcome, 48)
    assert (verdict.status, verdict.tokens) == (fse_pb2.STATUS_COMPLETED, 48)
    assert verdict.text == greedy_reference.text
    assert outcome.ids == greedy_reference.ids


# -- 8. why a completed stream ended ----------------------------------------------

# A JSON object as the whole prompt: the embedded model, greedy, answers a newline and
# then its end-of-generation token.
ENDS_AT_ONCE = '{"name": "Alice", "age": 30}'


def test_completion_reason_on_the_wire(main: Daemon, main_channel: grpc.Channel) -> None:
    """Verdict.completion says why a completed stream ended (max_tokens, a stop sequence,
    the model's end of generation), as the audit record does, and the Python client reads
    it; a halted or cancelled stream leaves it unspecified."""
    cases = {
        "completion-max-tokens": (start(PROMPT, 8), fse_pb2.COMPLETION_MAX_TOKENS, "max_tokens"),
        "completion-stop": (
            start(PROMPT, 48, stop=[" of"]),
            fse_pb2.COMPLETION_STOP_SEQUENCE,
            "stop_sequence",
        ),
        "completion-eog": (
            start(ENDS_AT_ONCE, 32),
            fse_pb2.COMPLETION_END_OF_GENERATION,
            "end_of_generation",
        ),
    }
    for request_id, (message, expected, _) in cases.items():
        message.start.request_id = request_id
        verdict = assert_well_formed(generate(main_channel, [message]))
        assert verdict.status == fse_pb2.STATUS_COMPLETED, (request_id, verdict)
        assert verdict.completion == expected, (request_id, verdict)
        if expected == fse_pb2.COMPLETION_END_OF_GENERATION:
            assert 0 < verdict.tokens < 32, verdict
    audited = {
        e["request_id"]: e["completion"]
        for e in audit_events(main, "stream.verdict")
        if e["request_id"] in cases
    }
    assert audited == {request_id: name for request_id, (_, _, name) in cases.items()}

    with fse_client.Client(main.addr) as client:
        ends = [
            list(client.generate(prompt, max_tokens=32, stop=stop, sampling=GREEDY))[-1]
            for prompt, stop in ((PROMPT, ()), (PROMPT, [" of"]), (ENDS_AT_ONCE, ()))
        ]
    assert [getattr(v, "completion", None) for v in ends] == [
        fse_client.Completion.MAX_TOKENS,
        fse_client.Completion.STOP_SEQUENCE,
        fse_client.Completion.END_OF_GENERATION,
    ]

    halted = generate(main_channel, [start(PROMPT, 8)], metadata=[("fse-debug-fault", "nan@2")])
    cancelled = generate(main_channel, [start(PROMPT, 8), CANCEL])
    assert assert_well_formed(halted).status == fse_pb2.STATUS_HALTED
    assert assert_well_formed(cancelled).status == fse_pb2.STATUS_CANCELLED
    for outcome in (halted, cancelled):
        assert outcome.verdict.completion == fse_pb2.COMPLETION_UNSPECIFIED
