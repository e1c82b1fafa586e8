"""Cancel, disconnect and the fail-closed rows through a real daemon: debug faults,
deadlines (timeout_ms and gRPC), queued streams, overload.

Most tests share the `main` and `single` daemons of tests/serve/conftest.py
(package-scoped); tests that kill or stop a daemon, or watch one start, get their own.
"""

from __future__ import annotations

import contextlib

import grpc
import pytest
from fse_client.v1 import fse_pb2
from grpc_health.v1 import health_pb2
from support.daemons import (
    LONG_PROMPT,
    Daemon,
    audit_events,
)
from support.streams import (
    CANCEL,
    LONG,
    Code,
    LiveStream,
    Outcome,
    assert_well_formed,
    generate,
    health_status,
    start,
)
from support.waits import wait_for

# -- 4. cancel and disconnect -----------------------------------------------------


def test_cancel_mid_stream_frees_the_slot(single: Daemon, single_channel: grpc.Channel) -> None:
    with LiveStream(single_channel, start(LONG_PROMPT, 1000, request_id="cancel-me")) as live:
        live.read_tokens(3)
        seen = len(live.outcome.tokens)
        live.send(CANCEL)
        outcome = live.finish()
    verdict = assert_well_formed(outcome)
    assert verdict.status == fse_pb2.STATUS_CANCELLED
    assert verdict.guard == ""
    # Generation stops within one decode step of the server reading the Cancel; the
    # slack covers tokens already in flight while this client was reading.
    assert verdict.tokens - seen <= 8, (seen, verdict.tokens)
    # --max-streams 1 --max-queue 0: the next stream is served only if the slot was freed.
    after = generate(single_channel, [start(max_tokens=8)])
    assert assert_well_formed(after, 8).status == fse_pb2.STATUS_COMPLETED
    verdicts = audit_events(single, "stream.verdict")
    (logged,) = [e for e in verdicts if e["request_id"] == "cancel-me"]
    assert logged["status"] == "cancelled"


def test_cancel_sent_with_start(single_channel: grpc.Channel) -> None:
    """A client may send its Cancel right behind the start (then half-close)."""
    outcome = generate(single_channel, [start(LONG_PROMPT, 1000), CANCEL])
    verdict = assert_well_formed(outcome, 1000)
    assert verdict.status == fse_pb2.STATUS_CANCELLED
    assert verdict.tokens < 1000


def test_client_disconnect_frees_the_slot(single: Daemon, single_channel: grpc.Channel) -> None:
    with single.channel() as channel:  # its own connection, dropped below
        live = LiveStream(channel, start(LONG_PROMPT, 1000, request_id="hang-up"))
        with live:
            live.read_tokens(3)
        # __exit__ cancelled the RPC from the client side.
        assert live.call.code() == Code.CANCELLED

    def ended() -> bool:
        return any(e["request_id"] == "hang-up" for e in audit_events(single, "stream.verdict"))

    wait_for(ended, what="a stream.verdict for the disconnected client")
    (logged,) = [e for e in audit_events(single, "stream.verdict") if e["request_id"] == "hang-up"]
    assert logged["status"] == "cancelled"
    assert logged["tokens"] < 1000
    assert single.process.poll() is None
    assert health_status(single_channel) == health_pb2.HealthCheckResponse.SERVING
    after = generate(single_channel, [start(max_tokens=8)])
    assert assert_well_formed(after, 8).status == fse_pb2.STATUS_COMPLETED


# -- 5. fail-closed rows ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "guard", "index"),
    [("nan@3", "non_finite", 3), ("inf@0", "non_finite", 0), ("guard-error@2", "internal", 2)],
)
def test_fault_halts(main_channel: grpc.Channel, fault: str, guard: str, index: int) -> None:
    outcome = generate(main_channel, [start(max_tokens=16)], metadata=[("fse-debug-fault", fault)])
    verdict = assert_well_formed(outcome, 16)
    assert verdict.status == fse_pb2.STATUS_HALTED
    assert verdict.guard == guard
    assert verdict.token_index == index
    assert verdict.tokens == index
    assert len(outcome.tokens) == index
    # The halted prefix is exactly what the unfaulted stream releases first.
    clean = generate(main_channel, [start(max_tokens=index)]) if index else Outcome()
    assert outcome.ids == clean.ids


def test_debug_faults_refused_unless_allowed(single_channel: grpc.Channel) -> None:
    outcome = generate(
        single_channel, [start(max_tokens=8)], metadata=[("fse-debug-fault", "nan@3")]
    )
    assert outcome.code == Code.INVALID_ARGUMENT
    assert "--allow-debug-faults" in outcome.details
    assert not outcome.messages


def test_timeout_ms_halts_with_deadline(main_channel: grpc.Channel) -> None:
    outcome = generate(main_channel, [start(LONG_PROMPT, LONG, timeout_ms=300)])
    verdict = assert_well_formed(outcome, LONG)
    assert verdict.status == fse_pb2.STATUS_HALTED
    assert verdict.guard == "deadline"
    assert verdict.threshold == pytest.approx(0.3)
    assert verdict.value >= 0.3
    assert verdict.token_index == verdict.tokens < LONG


def test_grpc_deadline_gets_a_deadline_verdict(main_channel: grpc.Channel) -> None:
    outcome = generate(main_channel, [start(LONG_PROMPT, LONG)], timeout=1.0)
    # The verdict arrives before the RPC's own deadline: status OK, not DEADLINE_EXCEEDED.
    verdict = assert_well_formed(outcome, LONG)
    assert verdict.status == fse_pb2.STATUS_HALTED
    assert verdict.guard == "deadline"
    assert 0 < verdict.threshold < 1.0
    assert verdict.tokens < LONG


def test_queued_streams_end_without_waiting_for_a_slot(main_channel: grpc.Channel) -> None:
    """With all 8 slots busy, a waiting stream still ends when its deadline passes (both
    kinds) or its client cancels: it does not wait for a slot, and a gRPC deadline does
    not cut it off without a verdict."""
    with contextlib.ExitStack() as stack:
        busy = [
            stack.enter_context(LiveStream(main_channel, start(LONG_PROMPT, LONG)))
            for _ in range(8)
        ]
        for live in busy:
            live.read_tokens(1)  # all 8 slots decoding
        by_grpc = generate(main_channel, [start(max_tokens=8)], timeout=1.0)
        by_timeout = generate(main_channel, [start(max_tokens=8, timeout_ms=300)])
        with LiveStream(main_channel, start(max_tokens=8)) as waiting:
            assert waiting.next().WhichOneof("kind") == "started"
            waiting.send(CANCEL)
            cancelled = waiting.finish()
        for live in busy:
            live.send(CANCEL)
        ends = [live.finish() for live in busy]
    for outcome in (by_grpc, by_timeout):
        verdict = assert_well_formed(outcome, 8)
        assert (verdict.status, verdict.guard) == (fse_pb2.STATUS_HALTED, "deadline")
        assert verdict.tokens == 0 and verdict.token_index == 0
        assert verdict.value >= verdict.threshold > 0
    assert by_timeout.verdict.threshold == pytest.approx(0.3)
    assert assert_well_formed(cancelled, 8).status == fse_pb2.STATUS_CANCELLED
    assert cancelled.verdict.tokens == 0
    # The busy streams were still running all along (none reached its max_tokens).
    for end in ends:
        verdict = assert_well_formed(end, LONG)
        assert verdict.status == fse_pb2.STATUS_CANCELLED and verdict.tokens < LONG


def test_overload_is_resource_exhausted_at_once(single_channel: grpc.Channel) -> None:
    with LiveStream(single_channel, start(LONG_PROMPT, 1000)) as live:
        live.read_tokens(1)
        # If this were queued it would wait for the 1000-token stream (or the deadline).
        second = generate(single_channel, [start(max_tokens=8)], timeout=30)
        assert second.code == Code.RESOURCE_EXHAUSTED, (second.code, second.details)
        assert "max_queue 0" in second.details
        assert not second.messages
        live.send(CANCEL)
        first = live.finish()
    assert assert_well_formed(first).status == fse_pb2.STATUS_CANCELLED
    after = generate(single_channel, [start(max_tokens=8)])
    assert assert_well_formed(after, 8).status == fse_pb2.STATUS_COMPLETED
